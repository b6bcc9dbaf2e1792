"""Validation sets of the paper's ten target tasks, built from each benchmark's own public files.

ICONS scores the pool against a small validation set per target task; the paper's sets were never
released (princetonvisualai/icons#5). These converters build them in LLaVA's conversation format
from splits the task is *not* evaluated on, with a fixed-seed sample and LLaVA-1.5's prompt for
each benchmark::

    python -m icons.data.benchmarks vqav2 --src v2_OpenEnded_mscoco_val2014_questions.json \\
        v2_mscoco_val2014_annotations.json --out val_sets --n 500 --seed 0

writes ``val_sets/vqav2.json`` (the records) and ``val_sets/vqav2.meta.json`` (sources, split,
sample size, seed; for a held-out set the ids evaluation must skip). A source that is the
evaluated split is refused (:class:`EvaluatedSplitError`). MME, MMBench and LLaVA-Bench
(in-the-wild) have no labelled split besides the evaluated one; for them ``--holdout`` carves the
validation set out of it and records the ids to exclude from evaluation (for LLaVA-W prefer
LLaVA-Bench (COCO), which is accepted as is).

| task | ``--src`` (in this order) | refused |
|---|---|---|
| vqav2 | questions JSON, annotations JSON | test-dev2015, test2015 |
| gqa | ``<split>_balanced_questions.json`` | testdev, test, challenge, submission |
| vizwiz | ``train.json`` / ``val.json`` | test |
| sqa | ``problems.json``, ``pid_splits.json`` (``--split`` val) | test, minitest |
| textvqa | ``TextVQA_0.5.1_train.json`` [, Rosetta OCR JSON] | val, test |
| pope | POPE question file, or COCO ``instances_train2014.json`` | COCO val2014 images |
| mme | ``MME_Benchmark_release_version/`` | all, unless ``--holdout`` |
| mmbench_en, mmbench_cn | MMBench dev TSV | all, unless ``--holdout`` |
| llavaw | questions JSONL, GPT-4 answers JSONL | in-the-wild, unless ``--holdout`` |
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import converters
from .common import EvaluatedSplitError, SourceError, sample

__all__ = ["EvaluatedSplitError", "SourceError", "TASKS", "convert", "sample"]

#: task -> (number of --src paths (min, max), what they are)
TASKS: dict[str, tuple[tuple[int, int], str]] = {
    "vqav2": ((2, 2), "v2_OpenEnded_mscoco_<split>_questions.json v2_mscoco_<split>_annotations.json"),
    "gqa": ((1, 1), "<split>_balanced_questions.json"),
    "vizwiz": ((1, 1), "train.json or val.json (VizWiz-VQA annotations)"),
    "sqa": ((2, 2), "problems.json pid_splits.json"),
    "textvqa": ((1, 2), "TextVQA_0.5.1_train.json [TextVQA_Rosetta_OCR_v0.2_train.json]"),
    "pope": ((1, 1), "a POPE question file or COCO instances_train2014.json"),
    "mme": ((1, 1), "MME_Benchmark_release_version/ (needs --holdout)"),
    "mmbench_en": ((1, 1), "MMBench dev TSV, English (needs --holdout)"),
    "mmbench_cn": ((1, 1), "MMBench dev TSV, Chinese (needs --holdout)"),
    "llavaw": ((2, 2), "questions.jsonl answers_gpt4.jsonl (or qa90_questions.jsonl qa90_gpt4_answer.jsonl)"),
}


def _run(task: str, src: Sequence[Path], out: Path, n: int, seed: int, split: str | None,
         image_prefix: str | None, holdout: bool, image_root: Path | None = None) -> tuple[list, dict]:
    c = converters
    kw = {"image_prefix": image_prefix}
    if task == "vqav2":
        return c.vqav2(src[0], src[1], n, seed, **kw)
    if task == "gqa":
        return c.gqa(src[0], n, seed, split=split, **kw)
    if task == "vizwiz":
        return c.vizwiz(src[0], n, seed, **kw)
    if task == "sqa":
        return c.sqa(src[0], src[1], n, seed, split=split or "val", **kw)
    if task == "textvqa":
        return c.textvqa(src[0], n, seed, ocr=src[1] if len(src) > 1 else None, **kw)
    if task == "pope":
        return c.pope(src[0], n, seed, **kw)
    if task == "mme":
        return c.mme(src[0], n, seed, holdout=holdout, **kw)
    if task in ("mmbench_en", "mmbench_cn"):
        return c.mmbench(src[0], n, seed, out, lang=task.split("_")[1], holdout=holdout, **kw)
    if task == "llavaw":
        return c.llavaw(src[0], src[1], n, seed, split=split, holdout=holdout, image_root=image_root, **kw)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def convert(task: str, src: Sequence[str | Path], out: str | Path, n: int = 500, seed: int = 0,
            split: str | None = None, image_prefix: str | None = None, holdout: bool = False,
            image_root: str | Path | None = None) -> Path:
    """Build ``out/<task>.json`` (+ ``out/<task>.meta.json``); returns the records' path.
    ``image_root``: where the records' image paths start (``data.image_root``), to check them
    where the benchmark's names are ambiguous (LLaVA-Bench (COCO))."""
    from ...io import write_json

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    (lo, hi), what = TASKS[task]
    src = [Path(s) for s in src]
    if not lo <= len(src) <= hi:
        raise ValueError(f"{task} takes {what} as --src ({len(src)} given)")
    for s in src:
        if not s.exists():
            raise FileNotFoundError(f"{task}: {s} does not exist")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, meta = _run(task, src, out, n, seed, split, image_prefix, holdout,
                         Path(image_root) if image_root is not None else None)
    path = out / f"{task}.json"
    write_json(path, records)
    write_json(out / f"{task}.meta.json", {"task": task, "sources": [str(s.resolve()) for s in src], "n": n,
                                            "seed": seed, "records": len(records), **meta})
    return path
