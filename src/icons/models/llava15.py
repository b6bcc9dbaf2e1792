"""LLaVA-1.5 at real scale: the stage-1 base assembled from its published parts.

ICONS's base model is LLaVA-1.5 *before* visual instruction tuning: a Vicuna-v1.5 LLM, the CLIP
ViT-L/14-336 vision tower and the stage-1 two-layer MLP projector
(``llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin``). :func:`assemble` builds a
``transformers.LlavaForConditionalGeneration`` from those three files, exactly as LLaVA's own
builder wires them:

- vision features from the penultimate CLIP layer (``vision_feature_layer=-2``), CLS dropped
  (``vision_feature_select_strategy="default"``), so 336/14 -> 576 image tokens;
- projector ``mlp2x_gelu``: LLaVA's ``model.mm_projector.{0,2}.{weight,bias}`` ->
  ``multi_modal_projector.linear_{1,2}``;
- an ``<image>`` token added to the tokenizer (LLaVA uses the out-of-vocabulary index -200; HF
  needs a real id). The embedding and LM-head rows of a new token are the mean of the existing
  rows (deterministic; the input row is never read, the image features replace it);
- ``pad_token = unk_token`` when the tokenizer has none (LLaVA's choice for ``--version v1``).

The other half is the data path both training and gradient extraction use (one code path):

- :class:`Preprocess`: LLaVA's ``image_aspect_ratio=pad``: pad to a square with the image
  processor's mean colour ``tuple(int(x * 255) for x in image_mean)``, then the CLIP processor
  (resize, centre crop, rescale, normalise) -> float32 (3, H, W), one HF processor
  (:func:`pad_processor`) that the export writes too;
- :class:`Encoder`: the ``vicuna_v1`` conversation template (``models/template.py``) through the
  one encoder every model uses (``data/encode.py``).

Any HF LLaVA checkpoint directory (``save_pretrained`` of an assembled or trained model, or a
``llava-hf`` conversion) loads with :func:`load`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.encode import ConversationEncoder
from .template import IMAGE_TOKEN, TEMPLATES, ChatTemplate

__all__ = [
    "DTYPES",
    "IMAGE_TOKEN",
    "Encoder",
    "Preprocess",
    "add_image_token",
    "assemble",
    "background_colour",
    "check_parts",
    "image_processor",
    "load",
    "load_projector",
    "make_encoder",
    "model_preprocess",
    "n_image_tokens",
    "processor_dir",
]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: LLaVA's mlp2x_gelu projector (nn.Sequential: Linear, GELU, Linear) -> HF's LlavaMultiModalProjector
_PROJECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                   "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------- the parts
def check_parts(llm_path: str | Path | None, vision_path: str | Path | None,
                projector_path: str | Path | None) -> Path:
    """Fail early, naming the missing part; returns the LLM directory."""
    for name, path, kind in (("model.llm_path", llm_path, "dir"), ("model.vision_path", vision_path, "dir"),
                             ("model.projector_path", projector_path, "file")):
        if not path:
            raise FileNotFoundError(f"{name} is not set (LLaVA-1.5 is assembled from an LLM directory, a CLIP "
                                    f"vision tower directory and the stage-1 mm_projector.bin)")
        p = Path(path)
        if not (p.is_dir() if kind == "dir" else p.is_file()):
            raise FileNotFoundError(f"{name}={p}: no such {'directory' if kind == 'dir' else 'file'}")
        if kind == "dir" and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{name}={p} has no config.json (expected a Hugging Face model directory)")
    return Path(llm_path)  # type: ignore[arg-type]


def load_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """LLaVA's ``mm_projector.bin`` -> state dict of HF's ``LlavaMultiModalProjector``.

    Keys are matched after ``mm_projector.`` as LLaVA's builder does (``model.mm_projector.0.weight``
    and ``mm_projector.0.weight`` both work). Anything but the four mlp2x_gelu tensors is an error.
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
    found = {k.split("mm_projector.", 1)[1]: v for k, v in raw.items() if "mm_projector." in k}
    if set(found) != set(_PROJECTOR_KEYS):
        raise ValueError(f"{path}: expected the mlp2x_gelu projector keys "
                         f"{sorted('model.mm_projector.' + k for k in _PROJECTOR_KEYS)}, found {sorted(raw)}")
    return {_PROJECTOR_KEYS[k]: v for k, v in found.items()}


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` (special) if missing, set ``pad = unk`` if there is no pad; returns its id."""
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError("the tokenizer has neither a pad nor an unk token")
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _mean_resize(llm, n: int) -> None:
    """Grow the vocabulary to n rows; new input and output rows = the mean of the old rows."""
    old = llm.get_input_embeddings().weight.shape[0]
    if n <= old:
        return
    llm.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[old:] = emb[:old].float().mean(0, keepdim=True).to(emb.dtype)
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out.weight[old:] = out.weight[:old].float().mean(0, keepdim=True).to(out.weight.dtype)


def _from_pretrained(cls, path, dtype, what: str):
    model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{what} {path}: weights missing from the checkpoint: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return model


def image_processor(path: str | Path, image_size: int | None = None):
    """The CLIP image processor saved in ``path`` (``preprocessor_config.json`` of a CLIP tower, or
    ``processor_config.json`` of a LLaVA checkpoint); else CLIP's defaults at the tower's size."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    p = Path(path)
    if (p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(p)
    if image_size is None:
        cfg = json.loads((p / "config.json").read_text())
        image_size = int(cfg.get("vision_config", cfg).get("image_size"))
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size},
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def n_image_tokens(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2  # 'default' drops CLS


def assemble(llm_path: str | Path, vision_path: str | Path, projector_path: str | Path,
             dtype: str | torch.dtype = "float32"):
    """(model, tokenizer, preprocess): the stage-1 LLaVA-1.5 from its three parts.

    ``llm_path``: a Hugging Face causal-LM directory (Vicuna-7B/13B-v1.5, with its tokenizer);
    ``vision_path``: a ``CLIPVisionModel`` directory, or a full ``CLIPModel`` one such as
    ``openai/clip-vit-large-patch14-336`` (its text half is ignored); ``projector_path``: LLaVA's
    stage-1 ``mm_projector.bin``. The submodules are the loaded ones (no copy, no random init).
    """
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, LlavaConfig,
                              LlavaForConditionalGeneration)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    check_parts(llm_path, vision_path, projector_path)
    dt = _dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    image_id = add_image_token(tokenizer)
    llm = _from_pretrained(AutoModelForCausalLM, llm_path, dt, "LLM")
    _mean_resize(llm, len(tokenizer))
    vision = _from_pretrained(CLIPVisionModel, vision_path, dt, "vision tower")
    proj = load_projector(projector_path)

    cfg = LlavaConfig(vision_config=vision.config, text_config=llm.config, image_token_index=image_id,
                      image_seq_length=n_image_tokens(vision.config), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=True, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    v_hidden, t_hidden = vision.config.hidden_size, llm.config.hidden_size
    want = {"linear_1.weight": (t_hidden, v_hidden), "linear_1.bias": (t_hidden,),
            "linear_2.weight": (t_hidden, t_hidden), "linear_2.bias": (t_hidden,)}
    for k, shape in want.items():
        if tuple(proj[k].shape) != shape:
            raise ValueError(f"{projector_path}: {k} has shape {tuple(proj[k].shape)}, the LLM and vision tower "
                             f"need {shape} (a projector trained for another LLM or tower?)")

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    projector = LlavaMultiModalProjector(cfg)
    projector.load_state_dict({k: v.to(dt) for k, v in proj.items()}, strict=True)
    model.model.multi_modal_projector = projector.to(dt)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a transformers change in LlavaForConditionalGeneration's layout
        raise RuntimeError(f"assembly left uninitialised tensors: {left[:5]}")
    model.config.dtype = dt
    if getattr(llm, "generation_config", None) is not None:
        model.generation_config = llm.generation_config
    model.eval()
    return model, tokenizer, Preprocess(image_processor(vision_path, vision.config.image_size))


def load(path: str | Path, dtype: str | torch.dtype = "float32"):
    """(model, tokenizer, preprocess) from a saved HF ``LlavaForConditionalGeneration`` directory."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.convert_ids_to_tokens(model.config.image_token_id) != IMAGE_TOKEN:
        raise ValueError(f"{path}: the tokenizer's id {model.config.image_token_id} (config.image_token_id) "
                         f"is not {IMAGE_TOKEN!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model.eval()
    return model, tokenizer, Preprocess(image_processor(path, model.config.vision_config.image_size))


def save(model, tokenizer, preprocess: "Preprocess", path: str | Path) -> None:
    """``save_pretrained`` of model, tokenizer and image processor: :func:`load` reads it back."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    preprocess.processor.save_pretrained(path)


# ---------------------------------------------------------------- images
def background_colour(image_mean: Sequence[float]) -> tuple[int, ...]:
    """LLaVA: ``tuple(int(x * 255) for x in processor.image_mean)`` (truncated, not rounded)."""
    return tuple(int(x * 255) for x in image_mean)


def pad_processor(clip):
    """LLaVA-1.5's ``image_aspect_ratio=pad`` as one HF image processor: a square canvas of the
    image's longer side in the mean colour (:func:`background_colour`, as LLaVA's
    ``expand2square``), then ``clip``'s resize, centre crop, rescale and normalise. Training and
    the exported checkpoint both preprocess through it."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    d = clip.to_dict()
    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb")
    return LlavaImageProcessorPil(**{k: d[k] for k in keys if k in d}, do_pad=True)


class Preprocess:
    """PIL image -> float32 (3, H, W) model input through :func:`pad_processor` of the vision
    tower's CLIP image processor."""

    def __init__(self, clip):
        self.processor = pad_processor(clip)
        crop = clip.crop_size
        self.size = int(crop["height"] if isinstance(crop, dict) else crop.height)
        self.background = background_colour(clip.image_mean)

    def __call__(self, image: Image.Image) -> np.ndarray:
        out = self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------- conversations
class Encoder(ConversationEncoder):
    """LLaVA-1.5's encoder: the ``vicuna_v1`` template (``models/template.py``), pixels float32
    (3, H, W), already normalised by :class:`Preprocess` (``collate`` stacks them as they are)."""

    def __init__(self, tokenizer, preprocess: Preprocess, n_image_tokens: int, max_length: int,
                 image_root: str | Path | None = None, template: ChatTemplate = TEMPLATES["vicuna_v1"]):
        self.preprocess = preprocess
        super().__init__(tokenizer, template, n_image_tokens, max_length, preprocess.size, preprocess, image_root)


def processor_dir(model_cfg: Any) -> str:
    """Where a ``model`` config's image processor lives: kind llava_1_5: the CLIP tower's
    directory; kind hf_llava: the checkpoint's."""
    return model_cfg.vision_path if model_cfg.kind == "llava_1_5" else model_cfg.path


def model_preprocess(model_cfg: Any) -> Preprocess:
    """The image preprocessing of a ``model`` config, checked against ``model.image_size``."""
    src = processor_dir(model_cfg)
    pre = Preprocess(image_processor(src, int(model_cfg.image_size)))
    if pre.size != int(model_cfg.image_size):
        raise ValueError(f"model.image_size={model_cfg.image_size} but the image processor in {src} crops to "
                         f"{pre.size}")
    return pre


def make_encoder(model_cfg: Any, tokenizer, image_root: str | Path | None = None) -> Encoder:
    """The vicuna_v1 encoder for a ``model`` config (kind llava_1_5: the tower's image processor;
    kind hf_llava: the checkpoint's). Checks the config's image and patch size against the files."""
    n = (int(model_cfg.image_size) // int(model_cfg.patch_size)) ** 2
    return Encoder(tokenizer, model_preprocess(model_cfg), n, int(model_cfg.max_length), image_root)


def load_base(model_cfg: Any):
    """(model, tokenizer) of a ``model`` config with the vicuna_v1 template (kinds llava_1_5 and
    hf_llava), checked against ``model.image_size``/``model.patch_size``."""
    if model_cfg.kind == "llava_1_5":
        model, tok, _ = assemble(model_cfg.llm_path, model_cfg.vision_path, model_cfg.projector_path,
                                 model_cfg.dtype)
    else:
        model, tok, _ = load(model_cfg.path, model_cfg.dtype)
    vc = model.config.vision_config
    if (vc.image_size, vc.patch_size) != (int(model_cfg.image_size), int(model_cfg.patch_size)):
        raise ValueError(f"model.image_size/patch_size={model_cfg.image_size}/{model_cfg.patch_size} but the "
                         f"vision tower is {vc.image_size}/{vc.patch_size}")
    return model, tok
