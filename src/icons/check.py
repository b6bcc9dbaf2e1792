"""The ``check`` stage: validate the pool and every task file before any model work.

    python -m icons.run stages=[check]                                   # the embedded benchmark
    python -m icons.run stages=[check] data=llava_json data.path=pool.jsonl data.image_root=images

Every record of the pool and of each task's ``val`` and ``test`` file is read and checked
(:mod:`icons.data.llava_json`: JSON, ids, turns, ``<image>`` tokens, image files decoded, length
against ``model.max_length`` with the model's tokenizer). A summary is printed (records, with
image, text-only, problems by kind, repairs, truncated answers) and written to
``<run_dir>/check/`` (``summary.json``, ``problems.jsonl``). Under ``data.on_bad_record=error`` any
problem stops the run with a :class:`~icons.data.llava_json.BadInputError` whose one line names the
first problem's file, record position, id, field and what is wrong; under ``skip`` only problems
that no skipping can cure stop it (a file that cannot be read, an empty pool or validation set,
colliding task names).

Also here: what ``stage_data`` does (:func:`prepare_data`): index the pool for lazy reading, validate a
user's pool and the task files that are not the generated benchmark's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .data.llava_json import (
    BadInputError,
    PoolFileError,
    ReadResult,
    file_signature,
    format_problem,
    problem,
    read_pool,
    scan_file,
    summary_error,
)
from .config import vicuna_template
from .io import config_hash, read_json, save_npy, write_json, write_jsonl

__all__ = ["DataSources", "check_encoder", "check_inputs", "data_key", "data_sources", "prepare_data",
           "prepare_pool", "prepare_tasks", "run_check", "task_name_problems"]

#: problem lines printed by the check (all of them are in problems.jsonl)
SHOW = 20
SPLITS = ("val", "test")


@dataclass
class DataSources:
    """Where the pool and the task files of a config are (before the data stage copies anything).
    ``test`` is empty for tasks without test splits (``tasks.kind=llava_benchmarks``);
    ``task_roots`` overrides ``task_image_root`` per task."""

    kind: str
    pool: Path
    image_root: Path
    task_image_root: Path | None
    val: dict[str, Path]
    test: dict[str, Path]
    task_roots: dict[str, Path] = field(default_factory=dict)

    def task_root(self, task: str) -> Path | None:
        return self.task_roots.get(task, self.task_image_root)


def task_name_problems(names: list[str], known: tuple[str, ...] | None = None) -> list[dict]:
    """Task names that cannot all live side by side: equal up to case (``tasks/<name>/`` on a
    case-insensitive file system), not a plain directory name, or (given ``known``) unknown."""
    probs: list[dict] = []
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        where = f"tasks.names[{i}]"
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            probs.append(problem("config", None, None, None, where, "task_name_collision",
                                 f"task name {name!r} is not a plain directory name"))
            continue
        other = seen.setdefault(name.casefold(), name)
        if other != name or names.index(name) != i:
            probs.append(problem("config", None, None, None, where, "task_name_collision",
                                 f"task name {name!r} collides with {other!r} (task directories would be shared)"))
        elif known is not None and name not in known:
            probs.append(problem("config", None, None, None, where, "unknown_task",
                                 f"unknown task {name!r}; the tasks group provides: {', '.join(known)}"))
    return probs


def data_sources(cfg: DictConfig) -> DataSources:
    """The pool file and the task files of ``cfg`` (the mini-LLaVA benchmark is generated once into
    the cache when the pool or the tasks come from it: data work, never model work). Raises
    :class:`BadInputError` for bad task names or a missing benchmark validation file."""
    from .data.mini_llava import TASK_NAMES

    names = list(cfg.tasks.names)
    real_tasks = cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks"
    bad = task_name_problems(names, None if real_tasks else tuple(TASK_NAMES))
    if bad:
        raise BadInputError(summary_error(bad), bad)
    bench = None
    if cfg.data.kind == "mini_llava" or not real_tasks:
        from .stages import mini_llava_benchmark

        bench = mini_llava_benchmark(cfg)
    if cfg.data.kind == "llava_json":
        pool = Path(cfg.data.path).expanduser().resolve()
        root = Path(cfg.data.image_root).expanduser().resolve() if cfg.data.image_root else pool.parent
    else:
        pool, root = bench.pool_path, bench.image_root
    if real_tasks:
        return _benchmark_sources(cfg, pool, root, names)
    val = {t: bench.task_path(t, "val") for t in names}
    test = {t: bench.task_path(t, "test") for t in names}
    return DataSources(cfg.data.kind, pool, root, bench.image_root, val, test)


def _benchmark_sources(cfg: DictConfig, pool: Path, root: Path, names: list[str]) -> DataSources:
    """Validation files written by ``python -m icons.data.benchmarks`` (no test splits)."""
    from .data.benchmarks.sets import task_files

    t = cfg.tasks
    task_root = Path(t.image_root).expanduser().resolve() if t.get("image_root") else root
    val, roots = task_files(t.dir, names, task_root)
    return DataSources(cfg.data.kind, pool, root, task_root, val, {}, roots)


def _tokenizer_dir(cfg: DictConfig) -> Path:
    """Where the model's tokenizer is, without building or pretraining anything."""
    from .models.base import ASSET
    from .stages import base_recipe

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
    """The encoder the pipeline will use (as ``stages.make_encoder``: same template, tokenizer,
    image tokens, max_length), for lengths. Loads tokenizer and image processor, never weights."""
    from .data.encode import Encoder
    from .models.tiny_llava import n_image_tokens

    m = cfg.model
    if vicuna_template(m):  # LLaVA-1.5's template (models/llava15.py)
        from transformers import AutoTokenizer

        from .models import llava15

        tok = AutoTokenizer.from_pretrained(m.llm_path if m.kind == "llava_1_5" else m.path)
        llava15.add_image_token(tok)
        return llava15.make_encoder(m, tok)
    tok = _tokenizer(str(_tokenizer_dir(cfg)))
    return Encoder(tok, n_image_tokens(m.image_size, m.patch_size), m.image_size, m.max_length)


def _model_key(cfg: DictConfig) -> dict:
    # model.path, not the resolved tokenizer directory: that one moves from the shipped asset to
    # the cache once the base stage has pretrained a new recipe, which must not redo the data stage
    m = cfg.model
    return {"max_length": m.max_length, "image_size": m.image_size, "patch_size": m.patch_size,
            "path": m.path, **{k: m.get(k) for k in ("template", "llm_path", "vision_path") if m.get(k)}}


def data_key(cfg: DictConfig) -> dict:
    """What a data result depends on besides the config: the user's files (an edited pool or
    validation file is read again), the model's length limit (records are checked against it) and,
    for the miniature benchmark, the generator's version."""
    key: dict = {}
    if cfg.data.kind == "llava_json":
        key["source"] = file_signature(Path(cfg.data.path).expanduser())
    if cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks":
        from .data.benchmarks.sets import task_files

        t = cfg.tasks
        val, _ = task_files(t.dir, list(t.names), Path("."))
        key["tasks"] = [file_signature(p) for p in val.values()]
        key["meta"] = [file_signature(p.with_suffix(".meta.json")) for p in val.values()]
    if key:
        key["model"] = _model_key(cfg)
    if cfg.data.kind == "mini_llava":  # the generated benchmark changes with the generator's code
        from .data.mini_llava.build import GENERATOR_VERSION

        key["generator"] = GENERATOR_VERSION
    return key


# --------------------------------------------------------------------------- the check
def _scan(path: Path, image_root: Path | None, encoder, with_answer: bool, role: str, task: str | None,
          fatal: list[dict]) -> tuple[dict, ReadResult | None]:
    info = {"role": role, "task": task, "file": str(path)}
    try:  # the pool's good records are counted, not kept: it may be several GB
        res = scan_file(path, image_root, encoder=encoder, with_answer=with_answer, keep_records=role != "pool",
                        task=task)
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

    Returns ``{"files": [per-file stats], "problems": [...], "fatal": [...], "truncated": [...]}``
    (``fatal``: problems that no skipping cures; they are also in ``problems``)."""
    src = sources or data_sources(cfg)
    enc = encoder or check_encoder(cfg)
    files, problems, fatal, truncated = [], [], [], []
    jobs = [(src.pool, src.image_root, True, "pool", None)]
    for task in cfg.tasks.names:
        jobs.append((src.val[task], src.task_root(task), True, "val", task))
        if task in src.test:
            jobs.append((src.test[task], src.task_root(task), False, "test", task))
    for path, root, with_answer, role, task in jobs:
        n_fatal = len(fatal)
        info, res = _scan(Path(path), root, enc, with_answer, role, task, fatal)
        files.append(info)
        if res is not None:
            problems += res.problems
            truncated += res.truncated
        problems += fatal[n_fatal:]
    return {"files": files, "problems": problems, "fatal": fatal, "truncated": truncated,
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
        elif f["role"] != "pool" and f["ok"] == f["records"] and not (f["fixes"] or f["image_modes"] or f["truncated"]):
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
    probs = report["problems"]
    lines.append(f"{len(probs)} problem(s)" + (f" by kind: {_counts(_kinds(probs))}" if probs else ""))
    lines += [f"  {format_problem(p)}" for p in probs[:SHOW]]
    if len(probs) > SHOW:
        lines.append(f"  ... and {len(probs) - SHOW} more")
    return lines


def run_check(run) -> dict:
    """The ``check`` stage (see the module docstring)."""
    from .stages import finish, finished, section

    cfg = run.cfg
    out = run.run_dir / "check"
    t0 = time.time()
    try:
        src = data_sources(cfg)
    except BadInputError as err:
        print(f"[icons] check: {err}", flush=True)
        raise
    key = config_hash({**section(cfg, "data", "tasks"), "model": _model_key(cfg),
                       "files": [file_signature(p) for p in [src.pool, *src.val.values(), *src.test.values()]],
                       **data_key(cfg)})
    if m := finished(out, key):
        print(f"[icons] check: passed before for these files ({m['records']} pool records, "
              f"{m['problems']} problems)", flush=True)
        return m
    report = check_inputs(cfg, src)
    write_jsonl(out / "problems.jsonl", report["problems"])
    write_jsonl(out / "truncated.jsonl", report["truncated"])
    write_json(out / "summary.json", {"files": report["files"], "max_length": report["max_length"],
                                      "n_problems": len(report["problems"]), "n_fatal": len(report["fatal"]),
                                      "on_bad_record": cfg.data.on_bad_record})
    for line in summary_lines(report):
        print(f"[icons] check: {line}", flush=True)
    probs, fatal = report["problems"], report["fatal"]
    _log_to_wandb(run, out, report)
    where = f"; all listed in {out / 'problems.jsonl'}"
    if fatal:
        raise BadInputError(summary_error(fatal, where), fatal)
    if probs and cfg.data.on_bad_record == "error":
        raise BadInputError(summary_error(probs, where + "; data.on_bad_record=skip skips bad records"), probs)
    pool = report["files"][0]
    return finish(out, key, t0, records=pool["records"], ok=pool["ok"], with_image=pool["with_image"],
                  text_only=pool["text_only"], problems=len(probs), truncated=len(report["truncated"]),
                  on_bad_record=cfg.data.on_bad_record)


def _log_to_wandb(run, out: Path, report: dict) -> None:
    """Problem counts (total and by kind) and the problem list, whether the check passes or not."""
    from . import tracking

    kinds = _kinds(report["problems"])
    with tracking.stage_run(run.cfg, "check", run.run_dir) as wrun:
        tracking.log_summary(wrun, {"check/records": report["files"][0].get("records", 0),
                                    "check/problems": len(report["problems"]), "check/fatal": len(report["fatal"]),
                                    "check/truncated": len(report["truncated"]),
                                    **{f"check/problems/{k}": v for k, v in kinds.items()}})
        tracking.log_files(wrun, "check", "check", [out / "summary.json", out / "problems.jsonl"])


# --------------------------------------------------------------------------- the data stage
def _absolute_image(rec: dict, root: Path) -> dict:
    image = rec.get("image")
    if isinstance(image, str) and not Path(image).is_absolute():
        return dict(rec, image=str(root / image))
    return rec


def prepare_data(cfg: DictConfig, out: Path) -> dict:
    """What ``stage_data`` does; returns the data manifest's fields.

    The pool is never copied: ``pool`` names the source file, ``index`` its byte-offset index
    (``data/index/``, :mod:`icons.data.pool`), ``ids`` (``data/ids.json``) the pool's ids in
    order and, for a user's file, ``positions`` (``data/positions.npy``) the file positions of
    its good records. Task files are used in place when both pool and tasks are the generated
    benchmark's; otherwise they are validated and written to ``data/tasks/<task>/<split>.json``
    with absolute image paths (their images are not under the pool's image_root)."""
    src = data_sources(cfg)
    generated = cfg.data.kind == "mini_llava" and cfg.tasks.get("kind", "mini_llava") == "mini_llava"
    enc = None if generated else check_encoder(cfg)  # the generated files are only indexed here
    fields = prepare_pool(cfg, src, out, enc)
    if generated:
        fields.update(val={t: str(p) for t, p in src.val.items()}, test={t: str(p) for t, p in src.test.items()})
        return fields
    tasks = prepare_tasks(cfg, src, out, enc)
    fields["counts"].update(tasks.pop("counts"))
    bad = fields.pop("bad", []) + tasks.pop("bad")
    write_jsonl(out / "bad_records.jsonl", bad)
    if bad:
        print(f"[icons] data: skipped {len(bad)} problem(s) in {len({(p['file'], p['position']) for p in bad})} "
              f"record(s) ({_counts(_kinds(bad))}); listed in {out / 'bad_records.jsonl'}", flush=True)
    return {**fields, **tasks, "problems": _kinds(bad), "bad_records": str(out / "bad_records.jsonl")}


def prepare_pool(cfg: DictConfig, src: DataSources, out: Path, encoder) -> dict:
    """Index the pool file; for a user's file, validate it record by record first (good records
    are counted and their positions and ids kept, never the records themselves)."""
    from .data.pool import LazyPool, index_file

    index = index_file(src.pool, out / "index")
    fields = {"pool": str(src.pool), "index": str(index), "signature": file_signature(src.pool),
              "image_root": str(src.image_root), "positions": None, "ids": str(out / "ids.json")}
    if cfg.data.kind != "llava_json":  # the generated pool: every record is good (the check stage says so)
        from .stages import mini_llava_benchmark

        bench = mini_llava_benchmark(cfg)  # built already, by data_sources
        write_json(out / "ids.json", LazyPool(src.pool, index).ids, indent=None)
        return {**fields, "meta": str(bench.meta_path), "counts": read_json(bench.root / "manifest.json")["counts"]}
    res = read_pool(src.pool, src.image_root, cfg.data.on_bad_record, encoder=encoder, keep_records=False)
    save_npy(out / "positions.npy", np.asarray(res.positions, dtype=np.int64))
    write_json(out / "ids.json", res.ids, indent=None)
    return {**fields, "positions": str(out / "positions.npy"), "meta": None, "source": str(src.pool),
            "counts": {"records": res.stats["records"], "pool": res.stats["ok"], "skipped": res.stats["bad"]},
            "fixes": res.stats["fixes"], "image_modes": res.stats["image_modes"],
            "truncated": res.stats["truncated"], "bad": res.problems}


def prepare_tasks(cfg: DictConfig, src: DataSources, out: Path, encoder) -> dict:
    """Validate each task's files and write their good records (ids as given, absolute images)."""
    policy = cfg.data.on_bad_record
    val, test, counts, bad = {}, {}, {}, []
    for task in cfg.tasks.names:
        splits = [("val", val, src.val)] + ([("test", test, src.test)] if task in src.test else [])
        for split, dest, files in splits:
            root = src.task_root(task)
            res = read_pool(files[task], root, policy, encoder=encoder, with_answer=split != "test", task=task)
            path = out / "tasks" / task / f"{split}.json"
            write_json(path, [_absolute_image(r, root) for r in res.records])
            dest[task] = str(path)
            counts[f"{task}/{split}"] = len(res.records)
            if res.problems:
                counts[f"{task}/{split}_skipped"] = res.stats["bad"]
            bad += res.problems
    return {"val": val, "test": test, "counts": counts, "bad": bad}


def _kinds(problems: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return dict(sorted(kinds.items()))
