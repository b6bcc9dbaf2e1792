"""The check: every record of the pool and of each task's ``val`` and ``test`` file, validated before
any model work (:mod:`icons.data.llava_json`: JSON, ids, turns, ``<image>`` tokens, image files
decoded, length against ``model.max_length`` with the model's tokenizer), and the summary printed
of it (records, with image, text-only, problems by kind, repairs, truncated answers).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .llava_json import PoolFileError, ReadResult, format_problem, problem, scan_file
from .sources import DataSources, data_sources

__all__ = ["check_inputs", "problem_kinds", "summary_lines"]

#: problem lines printed by the check (all of them are in problems.jsonl)
SHOW = 20


def _scan(path: Path, image_root: Path | None, encoder, with_answer: bool, role: str, task: str | None,
          fatal: list[dict], repeated_ids: str) -> tuple[dict, ReadResult | None]:
    info = {"role": role, "task": task, "file": str(path)}
    try:  # the pool's good records are counted, not kept: it may be several GB
        res = scan_file(path, image_root, encoder=encoder, with_answer=with_answer, keep_records=role != "pool",
                        task=task, repeated_ids=repeated_ids)
    except PoolFileError as err:
        fatal.extend(err.problems)
        return {**info, "error": str(err)}, None
    if res.stats["records"] == 0:
        what = "pool" if role == "pool" else f"{task} {role} set"
        fatal.append(problem(path, None, None, None, None, "empty_file", f"the {what} is empty (no records)"))
    elif not res.stats["ok"]:
        fatal.append(problem(path, None, None, None, None, "empty_file",
                             f"none of its {res.stats['records']} records is usable"))
    return {**info, **res.stats}, res


def check_inputs(cfg: DictConfig, sources: DataSources | None = None, encoder=None) -> dict:
    """Validate the pool and every task file; nothing is raised for bad records.

    Returns ``{"files": [per-file stats], "problems": [...], "fatal": [...], "truncated": [...],
    "repeated": [...]}`` (``fatal``: problems that no skipping cures, also in ``problems``;
    ``repeated``: records whose id an earlier record of the same file has, with both positions)."""
    src = sources or data_sources(cfg)
    if encoder is None:
        from ..models.loading import check_encoder

        encoder = check_encoder(cfg)
    enc = encoder
    files, problems, fatal, truncated, repeated = [], [], [], [], []
    policy = cfg.data.get("repeated_ids", "warn")
    jobs = [(src.pool, src.image_root, True, "pool", None)]
    for task in cfg.tasks.names:
        jobs.append((src.val[task], src.task_root(task), True, "val", task))
        if task in src.test:
            jobs.append((src.test[task], src.task_root(task), False, "test", task))
    for path, root, with_answer, role, task in jobs:
        n_fatal = len(fatal)
        info, res = _scan(Path(path), root, enc, with_answer, role, task, fatal, policy)
        files.append(info)
        if res is not None:
            problems += res.problems
            truncated += res.truncated
            repeated += res.repeated
        problems += fatal[n_fatal:]
    return {"files": files, "problems": problems, "fatal": fatal, "truncated": truncated, "repeated": repeated,
            "max_length": enc.max_length}


def _counts(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def summary_lines(report: dict) -> list[str]:
    """The printed summary: one line per pool/task, then the problems (at most SHOW of them)."""
    lines = []
    tasks: dict[str, list[str]] = {}
    for f in report["files"]:
        if "error" in f:
            desc = f"cannot be read: {f['error']}"
        elif f["role"] != "pool" and f["ok"] == f["records"] and not (f["fixes"] or f["image_modes"] or f["truncated"]
                                                                       or f.get("repeated_ids")):
            desc = f"{f['ok']} ok"
        else:
            desc = (f"{f['records']} records ({f['with_image']} with image, {f['text_only']} text-only): "
                    f"{f['ok']} ok, {f['bad']} bad")
            if f["problems"]:
                desc += f"; problems: {_counts(f['problems'])}"
            if f["fixes"]:
                desc += f"; repaired: {_counts(f['fixes'])}"
            if f["image_modes"]:
                desc += f"; converted to RGB: {_counts(f['image_modes'])}"
            if f["truncated"]:
                desc += f"; answers cut to max_length={report['max_length']}: {f['truncated']}"
            if f.get("repeated_ids"):
                desc += f"; repeated ids (kept): {f['repeated_ids']}"
        if f["role"] == "pool":
            lines.append(f"pool {f['file']}: {desc}")
        else:
            tasks.setdefault(f["task"], []).append(f"{f['role']} {desc}")
    for task, parts in tasks.items():
        lines.append(f"task {task}: " + " | ".join(parts))
    cut = report["truncated"]
    if cut:
        shown = ", ".join(f"{Path(t['file']).name} record {t['position']} id {t['id']!r} ({t['tokens']} tokens)"
                          for t in cut[:5])
        lines.append(f"{len(cut)} record(s) longer than model.max_length={report['max_length']} keep their image; "
                     f"their answer text is cut: {shown}{' ...' if len(cut) > 5 else ''}")
    rep = report.get("repeated", [])
    if rep:
        shown = ", ".join(f"{Path(r['file']).name} record {r['position']} id {r['id']!r} (as record "
                          f"{r['first_position']})" for r in rep[:5])
        lines.append(f"{len(rep)} record(s) repeat an earlier record's id; ids are labels, every record is kept "
                     f"(data.repeated_ids=error refuses them): {shown}{' ...' if len(rep) > 5 else ''}")
    probs = report["problems"]
    lines.append(f"{len(probs)} problem(s)" + (f" by kind: {_counts(problem_kinds(probs))}" if probs else ""))
    lines += [f"  {format_problem(p)}" for p in probs[:SHOW]]
    if len(probs) > SHOW:
        lines.append(f"  ... and {len(probs) - SHOW} more")
    return lines


def problem_kinds(problems: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return dict(sorted(kinds.items()))
