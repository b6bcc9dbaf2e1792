"""Evaluation hand-off: a trained model -> a merged HF LLaVA checkpoint for lmms-eval's ``llava_hf``.

lmms-eval's ``llava_hf`` model (``lmms_eval/models/simple/llava_hf.py``) loads the directory with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``, uses the
processor's tokenizer, puts ``"<image>\\n"`` before each question and formats it with the
tokenizer's chat template as one user message whose content is a *string* (its own Vicuna template
only when the tokenizer has none); the processor then expands every ``<image>`` to the model's
number of image tokens and preprocesses the image. An export therefore holds:

- the model with its LoRA merged into the base weights (peft ``merge_and_unload``), in the dtype it
  was trained in;
- the tokenizer and a ``LlavaProcessor`` whose ``patch_size`` and ``vision_feature_select_strategy``
  are the model's, ``num_additional_image_tokens=1`` (the CLIP tower's CLS, which ``default`` drops)
  and one chat template, shared by tokenizer and processor, that reproduces the prompt the model was
  trained on (``vicuna_v1``: LLaVA-1.5's; ``tiny``: the tiny model's) for string and list contents;
- the image processor of that template: ``vicuna_v1`` pads to a square with the mean colour, then
  resizes and centre-crops (LLaVA-1.5's ``image_aspect_ratio=pad``); ``tiny`` resizes to the
  model's size (``tiny_llava.pixels_uint8``);
- ``icons_export.json`` (key, source, template, dtype) and ``lmms_eval.sh``: the command that
  evaluates the checkpoint on the paper's ten benchmarks.

The directory is written under a temporary name and renamed when complete; an existing directory is
reused when it holds the same export (same key) and refused otherwise.

    python -m icons.export TRAINED_MODEL_DIR OUT_DIR [--template vicuna_v1] [--vision CLIP_DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .config import LMMS_EVAL_TASKS
from .models.template import adds_bos, speaks_vicuna, template_named
from .io import config_hash, read_json, write_json

from .handoff import INFO, write_command
#: bump when the exported files change meaning (part of every export's key)
FORMAT = "icons-llava-hf-1"


class ExportExists(FileExistsError):
    """The output directory holds something else. ``str(err)`` is one line."""


# ---------------------------------------------------------------- prompt and images
def image_processor_for(template: str, image_size: int, clip=None):
    """The image processor a template's model was trained with. ``vicuna_v1``: LLaVA-1.5's pad to
    a square, then ``clip`` (the vision tower's CLIP image processor); ``tiny``: the tiny model's
    resize to ``image_size``."""
    if template == "tiny":
        from .models.tiny_llava import image_processor

        return image_processor(image_size)
    if clip is None:
        raise ValueError("template vicuna_v1 needs the vision tower's CLIP image processor")
    from .models.llava15 import pad_processor

    return pad_processor(clip)


def model_image_processor(model_cfg):
    """The evaluation image processor of a ``model`` config (kind llava_1_5: the tower's; hf_llava
    with vicuna_v1: the checkpoint's)."""
    if not speaks_vicuna(model_cfg):
        return image_processor_for("tiny", int(model_cfg.image_size))
    from .models.llava15 import image_processor, processor_dir

    size = int(model_cfg.image_size)
    return image_processor_for("vicuna_v1", size, image_processor(processor_dir(model_cfg), size))


def build_processor(model, tokenizer, image_processor, template: str):
    """The ``LlavaProcessor`` lmms-eval loads (its ``<image>`` id checked against the model's).
    The tokenizer gets the same chat template: lmms-eval formats prompts with the tokenizer's."""
    from transformers import LlavaProcessor

    cfg = model.config
    if cfg.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"export supports CLIP vision towers, not {cfg.vision_config.model_type!r}")
    tokenizer.chat_template = template_named(template).jinja(bos=not adds_bos(tokenizer))
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    if proc.image_token_id != cfg.image_token_id:
        raise ValueError(f"the tokenizer's {proc.image_token!r} is id {proc.image_token_id}, the model's "
                         f"image_token_id is {cfg.image_token_id}")
    return proc


def image_tokens(processor) -> int:
    """How many tokens one ``<image>`` becomes (for a blank non-square picture)."""
    from PIL import Image

    ids = processor(text="<image>", images=Image.new("RGB", (48, 40)), return_tensors="np")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


def expected_image_tokens(model) -> int:
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if model.config.vision_feature_select_strategy == "full" else 0)  # 'full' keeps CLS


# ---------------------------------------------------------------- loading a trained model
def load_llava(path: str | Path, dtype="auto"):
    """(model, tokenizer) of an HF LLaVA directory, in the dtype it was saved in."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"{path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:8]}")
    return model, AutoTokenizer.from_pretrained(path)


def load_trained(path: str | Path, base: Callable[[], tuple] | None = None):
    """(model, tokenizer) of a trained model directory: a full LLaVA checkpoint (what the ``train``
    stage writes, LoRA already merged) or a peft LoRA adapter, loaded onto ``base()`` (else onto its
    ``base_model_name_or_path`` when that is a local directory) and left unmerged."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return load_llava(path)
    if base is None:
        src = read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not src or not (Path(src) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a LoRA adapter and its base {src!r} is not a local model "
                                    f"directory; give the base (--base DIR)")
        base = lambda: load_llava(src)  # noqa: E731
    model, tok = base()
    if (path / "tokenizer_config.json").is_file():  # the adapter's own (e.g. with <image> added)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return PeftModel.from_pretrained(model, path), tok


def merged(model):
    """The plain ``LlavaForConditionalGeneration``: LoRA folded into the weights (in place)."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"expected a LlavaForConditionalGeneration (or a peft model of one), got "
                        f"{type(model).__name__}")
    return model


# ---------------------------------------------------------------- writing
def existing(out: Path, key: str) -> dict | None:
    """The info of the same export already at ``out``; None if ``out`` is absent or empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    info = out / INFO
    if info.is_file() and read_json(info).get("key") == key:
        return read_json(info)
    what = f"another export (of {read_json(info).get('source')})" if info.is_file() else "files that are not an export"
    raise ExportExists(f"{out} already holds {what}; remove it or choose another output directory")


def _write_atomic(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` -> ``out``: a reader sees the whole export or none."""
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():  # left by an interrupted export
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        out.rmdir()  # empty: existing() refused anything else
    os.rename(tmp, out)


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def export(model, tokenizer, image_processor, out: str | Path, template: str, key: str, source: str = "") -> dict:
    """Write the merged checkpoint of ``model`` (a peft LoRA model is merged in place) to ``out``.

    Returns the export's info (``icons_export.json``). Same ``key`` already there: nothing is
    written; anything else there: :class:`ExportExists`."""
    out = Path(out)
    if (info := existing(out, key)) is not None:
        return info
    t0 = time.time()
    model = merged(model).eval()
    proc = build_processor(model, tokenizer, image_processor, template)
    n, want = image_tokens(proc), expected_image_tokens(model)
    if n != want:
        raise ValueError(f"the processor expands <image> to {n} tokens, the model makes {want} image features")
    import transformers

    info = {"key": key, "format": FORMAT, "source": source, "template": template, "dtype": dtype_name(model),
            "image_tokens": n, "transformers": transformers.__version__}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)  # tokenizer, image processor, chat template
        write_json(tmp / INFO, dict(info, wall_s=round(time.time() - t0, 2)))

    _write_atomic(out, write)
    return read_json(out / INFO)


def export_trained(trained: str | Path, out: str | Path, key: str, template: str, image_processor,
                   base: Callable[[], tuple] | None = None, tasks: Sequence[str] = LMMS_EVAL_TASKS,
                   num_processes: int = 1, output_path: str | Path | None = None) -> dict:
    """:func:`export` of a trained model directory (:func:`load_trained`) plus its lmms-eval
    command; the model is loaded only when the export is not there yet."""
    out = Path(out)
    if existing(out, key) is None:
        model, tok = load_trained(trained, base)
        export(model, tok, image_processor, out, template, key, source=str(Path(trained).resolve()))
    write_command(out, tasks, num_processes, output_path)
    return read_json(out / INFO)


# ---------------------------------------------------------------- CLI
def fingerprint(path: str | Path) -> str:
    """A directory's identity without reading its weights: path, names, sizes, modification times."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return config_hash({"path": str(p), "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
                                                  for f in files]})


def guess_template(tokenizer) -> str:
    """``tiny`` when the tokenizer has the tiny model's single ``ASSISTANT:`` token, else ``vicuna_v1``."""
    return "tiny" if "ASSISTANT:" in tokenizer.get_vocab() else "vicuna_v1"


def cli_inputs(trained: Path, template: str | None, vision: Path | None, base: Path | None):
    """(template, image processor, key) of a CLI export: the model's config and tokenizer are the
    trained dir's, or the base's for an adapter without them."""
    from transformers import AutoTokenizer

    own = (trained / "config.json").is_file()
    model_dir = trained if own else base
    tok_dir = trained if (trained / "tokenizer_config.json").is_file() else base
    if model_dir is None or tok_dir is None:
        raise FileNotFoundError(f"{trained} has no {'config.json' if not own else 'tokenizer'}: give --base")
    template = template or guess_template(AutoTokenizer.from_pretrained(tok_dir))
    image_size = int(read_json(model_dir / "config.json")["vision_config"]["image_size"])
    clip = None
    if template == "vicuna_v1":
        from .models.llava15 import image_processor

        clip = image_processor(vision or tok_dir, image_size)
    key = config_hash({"format": FORMAT, "trained": fingerprint(trained), "template": template,
                       "base": fingerprint(base) if base else None, "vision": fingerprint(vision) if vision else None})
    return template, image_processor_for(template, image_size, clip), key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icons.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trained", type=Path, help="trained model dir (full LLaVA checkpoint or LoRA adapter)")
    ap.add_argument("out", type=Path, help="the export's directory (must not hold anything else)")
    ap.add_argument("--template", choices=["tiny", "vicuna_v1"], help="prompt format (default: from the tokenizer)")
    ap.add_argument("--vision", type=Path,
                    help="dir with the CLIP image processor for vicuna_v1 (default: the trained dir's). The train "
                         "stage saves the tiny model's processor, so pass the vision tower for LLaVA-1.5 runs")
    ap.add_argument("--base", type=Path, help="base LLaVA dir of a LoRA adapter (default: the adapter's own)")
    ap.add_argument("--tasks", default=",".join(LMMS_EVAL_TASKS), help="lmms-eval tasks, comma-separated")
    ap.add_argument("--num-processes", type=int, default=1, help="accelerate launch --num_processes")
    ap.add_argument("--output-path", type=Path, help="lmms-eval's --output_path (default: OUT.lmms_eval)")
    a = ap.parse_args(argv)
    try:
        template, image_processor, key = cli_inputs(a.trained, a.template, a.vision, a.base)
        base = (lambda: load_llava(a.base)) if a.base else None
        info = export_trained(a.trained, a.out, key, template, image_processor, base,
                              [t for t in a.tasks.split(",") if t], a.num_processes, a.output_path)
    except (ExportExists, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[icons] exported {a.trained} -> {a.out} ({info['dtype']}, {template}, {info['image_tokens']} image tokens)")
    print(info["lmms_eval"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
