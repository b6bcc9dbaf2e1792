"""What a ``model`` config means, for every stage: its base, its encoder, loading and saving.

Two families share one interface: the tiny LLaVA (``kind=tiny_llava``, template ``tiny``: the
shipped or a cached stage-1 base) and LLaVA-1.5 (``kind=llava_1_5``, assembled from Vicuna, CLIP
and the stage-1 projector; or ``kind=hf_llava``, any HF LLaVA directory; template ``vicuna_v1``).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..io import config_hash, read_json
from .template import speaks_vicuna

log = logging.getLogger(__name__)


def base_recipe(cfg: DictConfig) -> dict:
    """The tiny base's recipe a config asks for (as ``icons_base.json`` records it)."""
    from ..data.mini_llava.pretraining import STREAM_VERSION
    from .base import phases_entry

    m = cfg.model
    return {"examples": m.pretrain.examples, "batch_size": m.pretrain.batch_size, "lr": m.pretrain.lr,
            "seed": m.pretrain.seed, "text_qa_fraction": m.pretrain.text_qa_fraction,
            "image_size": m.image_size, "patch_size": m.patch_size, "vision_hidden": m.vision_hidden,
            "vision_layers": m.vision_layers, "text_hidden": m.text_hidden, "text_layers": m.text_layers,
            "text_heads": m.text_heads, "max_length": m.max_length, "loss": m.pretrain.loss,
            "stream": STREAM_VERSION, "lm_examples": m.pretrain.lm_examples,
            **phases_entry(m.pretrain.get("phases"))}


def resolve_base(cfg: DictConfig) -> Path:
    """The base checkpoint: ``model.path`` if given; else the shipped tiny base when its recipe
    matches the config; else one pretrained into the cache (once per recipe). ``kind=llava_1_5``:
    the LLM directory, after checking the three parts exist (:func:`load_base` assembles them)."""
    from .base import ASSET, pretrain_base

    if cfg.model.kind == "llava_1_5":
        from .llava15 import check_parts

        return check_parts(cfg.model.llm_path, cfg.model.vision_path, cfg.model.projector_path)
    if cfg.model.path:
        return Path(cfg.model.path)
    recipe = base_recipe(cfg)
    multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    shipped = ASSET / "icons_base.json"
    if shipped.exists() and read_json(shipped)["recipe"] == recipe:
        return ASSET
    cached = Path(cfg.cache_dir) / "tiny_llava_base" / config_hash(recipe)
    if not (cached / "icons_base.json").exists():
        if multi:  # rank 0 runs this stage alone; the others wait for it
            raise RuntimeError(f"the tiny base for this model config is not pretrained yet: run "
                               f"`python -m icons.run stages=[data,base]` with one process first ({cached})")
        log.info("pretraining the tiny base into %s (once per recipe)", cached)
        tmp = cached.with_name(cached.name + ".partial")
        pretrain_base(tmp, **recipe, trainer_cfg=cfg.trainer)
        tmp.rename(cached)
    return cached


def load_base(model_cfg: DictConfig, path: str | Path):
    """(model, tokenizer) of the base at ``path`` (what :func:`resolve_base` returned)."""
    if speaks_vicuna(model_cfg):  # LLaVA-1.5: assembled from its parts, or an HF checkpoint
        from . import llava15

        return llava15.load_base(model_cfg)
    from . import tiny_llava

    return tiny_llava.load(path)


def save_model(model_cfg: DictConfig, model, tokenizer, path: Path) -> None:
    """A trained model as an HF checkpoint with the processor of its kind (LLaVA-1.5: the CLIP
    tower's image processor, so the directory loads like any llava-hf release)."""
    from . import llava15, tiny_llava

    if speaks_vicuna(model_cfg):
        llava15.save(model, tokenizer, llava15.model_preprocess(model_cfg), path)
    else:
        tiny_llava.save(model, tokenizer, path, model_cfg.image_size, model_cfg.patch_size)


def load_model(model_cfg: DictConfig, path: Path):
    """(model, tokenizer) of a directory written by :func:`save_model`."""
    from . import llava15, tiny_llava

    if speaks_vicuna(model_cfg):
        model, tok, _ = llava15.load(path, model_cfg.dtype)
        return model, tok
    return tiny_llava.load(path)


def set_gradient_checkpointing(model, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (LLaVA's recipe trains with ``--gradient_checkpointing True``): at 7B, 16 examples of 700
    tokens otherwise keep about 13 MiB of activations per token. Non-reentrant, so a frozen base
    with LoRA needs no input that requires grad. HF checkpoints only layers in training mode."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def dropout_free(model) -> bool:
    """No dropout anywhere: the model gives the same outputs in training mode as in eval mode
    (what checkpointed feature extraction needs, since HF checkpoints only in training mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return False
        cfg = getattr(module, "config", None)
        for name in ("attention_dropout", "hidden_dropout", "dropout", "activation_dropout"):
            if cfg is not None and float(getattr(cfg, name, 0.0) or 0.0) > 0:
                return False
    return True


def make_encoder(model_cfg: DictConfig, tokenizer, image_root: Path | None):
    """The encoder of a model config (its template, image tokens, preprocessing, max_length)."""
    from ..data.encode import Encoder
    from .tiny_llava import n_image_tokens

    m = model_cfg
    if speaks_vicuna(m):
        from . import llava15

        return llava15.make_encoder(m, tokenizer, image_root)
    return Encoder(tokenizer, n_image_tokens(m.image_size, m.patch_size), m.image_size, m.max_length, image_root)


def _tokenizer_dir(cfg: DictConfig) -> Path:
    """Where the tiny model's tokenizer is, without building or pretraining anything."""
    from .base import ASSET

    if cfg.model.path:
        return Path(cfg.model.path)
    cached = Path(cfg.cache_dir) / "tiny_llava_base" / config_hash(base_recipe(cfg))
    if (cached / "icons_base.json").exists():
        return cached
    return ASSET  # every tiny base's tokenizer is trained on the same closed corpus


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_encoder(cfg: DictConfig):
    """The encoder the pipeline will use (as :func:`make_encoder`), for checking lengths before
    any model work: loads the tokenizer and image processor, never weights."""
    m = cfg.model
    if speaks_vicuna(m):
        from transformers import AutoTokenizer

        from . import llava15

        tok = AutoTokenizer.from_pretrained(m.llm_path if m.kind == "llava_1_5" else m.path)
        llava15.add_image_token(tok)
        return llava15.make_encoder(m, tok)
    return make_encoder(m, _tokenizer(str(_tokenizer_dir(cfg))), None)
