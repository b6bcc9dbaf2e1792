"""The ``data`` stage: index the pool for lazy reading and materialise the task files; and the
readers every later stage uses (:func:`load_pool`, :func:`load_val`, :func:`data_paths`).

The pool is never copied or loaded whole: ``data/manifest.json`` names the source file, its
byte-offset index (``data/index/``, :mod:`icons.data.pool`) and ``data/ids.json`` (the pool's ids
in order). ``data.kind=llava_json``: the user's file is validated record by record
(:mod:`icons.data.llava_json`); with ``data.on_bad_record=skip`` the bad ones are left out
(``data/positions.npy`` holds the good ones' positions) and listed in ``data/bad_records.jsonl``
(file, position, id, field, kind, message). ``tasks.kind=llava_benchmarks``: the validation files
written by ``python -m icons.data.benchmarks`` are validated the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..data.check import problem_kinds
from ..data.llava_json import file_signature, read_pool
from ..data.pool import LazyPool, index_file
from ..data.sources import DataSources, data_key, data_sources, mini_llava_benchmark
from ..io import config_hash, read_json, save_npy, write_json, write_jsonl
from ..models.loading import check_encoder
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section

log = logging.getLogger(__name__)


def stage_data(run: Run) -> dict:
    cfg = run.cfg
    out = run.run_dir / "data"
    key = config_hash({"config": config_hash(section(cfg, "data", "tasks")), **data_key(cfg)})
    return cached_stage(run, "data", out, key, lambda wrun: prepare_data(cfg, out), pointer="data",
                        artifact=("pool", "dataset"), files=lambda d: [d / "manifest.json", d / "ids.json"],
                        summary=lambda m: {f"data/{k}": v for k, v in m.get("counts", {}).items()
                                           if isinstance(v, int)})


# ---------------------------------------------------------------- what later stages read
@dataclass
class DataPaths:
    pool: Path
    image_root: Path
    meta: Path | None
    val: dict[str, Path]
    test: dict[str, Path]


def _manifest(run: Run) -> dict:
    return read_json(run.run_dir / "data" / "manifest.json")


def data_paths(run: Run) -> DataPaths:
    m = _manifest(run)
    return DataPaths(Path(m["pool"]), Path(m["image_root"]), Path(m["meta"]) if m.get("meta") else None,
                     {k: Path(v) for k, v in m["val"].items()}, {k: Path(v) for k, v in m["test"].items()})


def load_pool(run: Run) -> LazyPool:
    """The pool as a lazy sequence (records read by position from the source file, never all at
    once): ``len``, indexing, iteration, ``.ids`` and ``.positions_of(ids)``."""
    m = _manifest(run)
    return LazyPool(m["pool"], m["index"], m.get("positions"), read_json(m["ids"]), m["signature"])


def load_val(run: Run) -> list[dict]:
    """Every task's validation records, each with its ``task`` (its group, with its ``subtask`` if
    it has one: ``influence.group_of``)."""
    recs = []
    for task, path in data_paths(run).val.items():
        for r in read_json(path):
            recs.append(dict(r, task=task))
    return recs


# ---------------------------------------------------------------- what the stage writes
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
        kinds = ", ".join(f"{k}={v}" for k, v in problem_kinds(bad).items())
        log.info("data: skipped %d problem(s) in %d record(s) (%s); listed in %s", len(bad),
                 len({(p["file"], p["position"]) for p in bad}), kinds, out / "bad_records.jsonl")
    return {**fields, **tasks, "problems": problem_kinds(bad), "bad_records": str(out / "bad_records.jsonl")}


def prepare_pool(cfg: DictConfig, src: DataSources, out: Path, encoder) -> dict:
    """Index the pool file; for a user's file, validate it record by record first (good records
    are counted and their positions and ids kept, never the records themselves)."""

    index = index_file(src.pool, out / "index")
    fields = {"pool": str(src.pool), "index": str(index), "signature": file_signature(src.pool),
              "image_root": str(src.image_root), "positions": None, "ids": str(out / "ids.json")}
    if cfg.data.kind != "llava_json":  # the generated pool: every record is good (the check stage says so)
        bench = mini_llava_benchmark(cfg)  # built already, by data_sources
        write_json(out / "ids.json", LazyPool(src.pool, index).ids, indent=None)
        return {**fields, "meta": str(bench.meta_path), "counts": read_json(bench.root / "manifest.json")["counts"]}
    res = read_pool(src.pool, src.image_root, cfg.data.on_bad_record, encoder=encoder, keep_records=False,
                    repeated_ids=cfg.data.repeated_ids)
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
            res = read_pool(files[task], root, policy, encoder=encoder, with_answer=split != "test", task=task,
                            repeated_ids=cfg.data.repeated_ids)
            path = out / "tasks" / task / f"{split}.json"
            write_json(path, [_absolute_image(r, root) for r in res.records])
            dest[task] = str(path)
            counts[f"{task}/{split}"] = len(res.records)
            if res.problems:
                counts[f"{task}/{split}_skipped"] = res.stats["bad"]
            bad += res.problems
    return {"val": val, "test": test, "counts": counts, "bad": bad}
