"""The ``select`` stage, ICONS steps 4-5 (the generalist): each selector's subset of the pool at
the same budget, as pool indices (``indices.npy``) and ids (``ids.json``).

``icons``: the tasks vote at each one's ``consensus.threshold_percentile`` and the top
``int(ratio * N)`` by votes are kept (``consensus.py``; another ``consensus.method`` names the row
after itself); ``random``: a seeded sample of the same size; the baselines (``length``, ``el2n``,
``semdedup``, ...: ``icons.selectors``) from the stores of the ``forward`` stage. ``selection.from_run``: the
selections of another finished run over the same pool, e.g. the subset 7B chose, to train 13B.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..config import CONSENSUS_CHOICES
from ..config.schema import SPECIALIST
from ..config.selector import BASELINE_CHOICES
from ..io import config_hash, read_json, save_npy, slow_point, write_json
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .data import load_pool, load_val
from .scores import load_scores


def icons_name(cfg: DictConfig) -> str:
    """Report row of the influence selector: 'icons' (vote) or the consensus variant's name."""
    return "icons" if cfg.consensus.method == "vote" else cfg.consensus.method


def selector_names(cfg: DictConfig) -> list[str]:
    return [icons_name(cfg) if s == "icons" else s for s in cfg.selectors]


def stage_select(run: Run) -> dict:
    cfg = run.cfg
    results = {}
    for sel in cfg.selectors:
        if sel == "full":
            continue
        name = icons_name(cfg) if sel == "icons" else sel
        out = run.run_dir / "selection" / name
        out.mkdir(parents=True, exist_ok=True)
        if cfg.selection.get("from_run"):
            key, compute, inputs = selection_from_run(run, Path(cfg.selection.from_run), name, out)
        elif sel == "random":
            key = config_hash({"data": run.key_of("data"), "sel": section(cfg, "selection")})
            compute, inputs = (lambda wrun, out=out, name=name: _write(out, name, *_random_rows(run))), ["data"]
        elif sel == "icons":
            key, compute, inputs = _icons(run, out, name, cfg.consensus.method)
        elif sel in CONSENSUS_CHOICES:  # another consensus on the same scores, as its own row
            key, compute, inputs = _icons(run, out, name, sel)
        elif sel.startswith(SPECIALIST):
            key, compute, inputs = _specialist(run, out, name, sel[len(SPECIALIST):])
        elif sel in BASELINE_CHOICES:
            key, compute, inputs = _baseline(run, out, name)
        else:
            raise ValueError(f"unknown selector {sel!r}; available: full, random, icons, a consensus method, "
                             f"{SPECIALIST}<task>, {', '.join(BASELINE_CHOICES)}")
        results[name] = cached_stage(
            run, f"select-{name}", out, key, compute, pointer=f"select/{name}", inputs=inputs,
            artifact=(f"selection-{name}", "selection"),
            files=lambda d: [*sorted(d.glob("*.npy")), d / "ids.json", d / "manifest.json"],
            summary=lambda m: {"select/n": m["n"], **{f"select/votes_{k}": v for k, v in
                                                      m.get("selected_vote_histogram", {}).items()}})
    return results


def _write(out: Path, name: str, idx: np.ndarray, pool, extra: dict | None = None) -> dict:
    """A selection's files: pool rows (``indices.npy``), their positions in the source file
    (``positions.npy``: a row's identity) and their ids (``ids.json``: labels, repeats kept)."""
    save_npy(out / "indices.npy", idx)
    slow_point("select")  # crash-test hook (off unless ICONS_TEST_SLOW_STAGE=select)
    save_npy(out / "positions.npy", pool.file_positions()[idx] if len(idx) else np.zeros(0, dtype=np.int64))
    write_json(out / "ids.json", [pool.ids[i] for i in idx])
    return {"selector": name, "n": int(len(idx)), "of": len(pool), **(extra or {})}


def _random_rows(run: Run) -> tuple[np.ndarray, object]:
    from ..consensus import budget

    pool = load_pool(run)
    k = budget(len(pool), run.cfg.selection.ratio)
    return np.sort(np.asarray(random.Random(run.cfg.selection.seed).sample(range(len(pool)), k), dtype=np.int64)), pool


def _needs_scores(run: Run, name: str) -> None:
    if "scores" not in run.pointers():
        raise FileNotFoundError(f"no task scores in {run.run_dir} for the {name} selection: run the scores "
                                f"stage, or set selection.from_run to reuse another run's selections")


def _icons(run: Run, out: Path, name: str, method: str):
    """The generalist: ``method`` (the consensus config's, or another selector's) over the task scores."""
    from .. import consensus

    cfg = run.cfg
    _needs_scores(run, name)
    sel = section(cfg, "selection", "consensus")
    sel["consensus"]["method"] = method
    if method != "stratified":  # a setting the method does not read stays out of its key
        sel["consensus"].pop("strata", None)
    key = config_hash({"scores": run.key_of("scores"), "sel": sel})

    def compute(wrun) -> dict:
        table, merge, _, _ = load_scores(run)
        c = cfg.consensus
        scores = merge[:, None] if method == "merge" else table
        idx = consensus.select(scores, cfg.selection.ratio, method, c.threshold_percentile, c.tie_break,
                               cfg.selection.seed, c.strata)
        v = consensus.votes(table, c.threshold_percentile)
        save_npy(out / "votes.npy", v.astype(np.int16))
        extra = {"vote_histogram": {int(k): int(n) for k, n in sorted(Counter(v.tolist()).items())},
                 "selected_vote_histogram": {int(k): int(n) for k, n in sorted(Counter(v[idx].tolist()).items())}}
        return _write(out, name, idx, load_pool(run), extra)

    return key, compute, ["scores"]


def _specialist(run: Run, out: Path, name: str, task: str):
    """One task's own top ``int(ratio * N)`` by its score (the paper's specialist; ties by index)."""
    from .. import consensus

    cfg = run.cfg
    _needs_scores(run, name)
    key = config_hash({"scores": run.key_of("scores"), "sel": section(cfg, "selection"), "specialist": task})

    def compute(wrun) -> dict:
        table, _, _, tasks = load_scores(run)
        column = table[:, [tasks.index(task)]]
        idx = consensus.select(column, cfg.selection.ratio, "mean", tie_break="index")
        return _write(out, name, idx, load_pool(run), {"task": task})

    return key, compute, ["scores"]


def _baseline(run: Run, out: Path, name: str):
    """A baseline selector (``icons.selectors``) over the forward stores it reads."""
    from ..consensus import budget
    from ..selectors import NEEDS
    from ..selectors.choose import SelectorInputs, choose
    from .forward import forward_stores

    cfg = run.cfg
    stores = forward_stores(run)
    missing = [m for m in NEEDS[name] if m not in stores]
    if missing:
        raise FileNotFoundError(f"the {name} selection reads the {' and '.join(missing)} forward store(s), which "
                                f"{run.run_dir} does not have: put forward before select in stages")
    key = config_hash({"data": run.key_of("data"), "sel": section(cfg, "selection"), "baseline": name,
                       "settings": section(cfg, "selector")["selector"].get(name, {}),
                       "stores": {m: run.key_of(f"forward/{m}") for m in NEEDS[name]},
                       **({"tokenizer": run.key_of("base"), "max_length": cfg.model.max_length}
                          if name == "length" else {})})

    def lengths():
        from ..data.encode import IGNORE
        from ..models.loading import check_encoder

        enc = check_encoder(cfg)
        return np.asarray([sum(t != IGNORE for t in enc.encode(r, load_image=False).labels) for r in load_pool(run)],
                          dtype=np.float64)

    def compute(wrun) -> dict:
        pool = load_pool(run)
        inp = SelectorInputs(len(pool), stores, [r["task"] for r in load_val(run)], list(cfg.tasks.names), lengths)
        idx, extra = choose(name, inp, budget(len(pool), cfg.selection.ratio), cfg.selector, cfg.selection.seed)
        return _write(out, name, idx, pool, extra)

    return key, compute, ["data", *[f"forward/{m}" for m in NEEDS[name]]]


def selection_from_run(run: Run, src_run: Path, name: str, out: Path):
    """Selection ``name`` of another finished run over the same pool (``selection.from_run``):
    the subset one model chose, to train another (the paper's 7B -> 13B transfer). Rows are
    matched by their position in the source file, and each must carry the id the source run
    recorded for it (a pool file that changed in between is refused)."""
    src = src_run / "selection" / name
    if not (src / "manifest.json").exists():
        raise FileNotFoundError(f"selection.from_run={src_run}: no finished selection {name!r} ({src}/manifest.json)")
    source = read_json(src / "manifest.json")
    key = config_hash({"from_run": str(src_run.resolve()), "source_key": source["key"], "data": run.key_of("data")})

    def compute(wrun) -> dict:
        ids = read_json(src / "ids.json")
        pool = load_pool(run)
        if (src / "positions.npy").exists():
            row_of = {int(p): k for k, p in enumerate(pool.file_positions())}
            wanted = np.load(src / "positions.npy").tolist()
            rows = [row_of.get(p) for p in wanted]
            bad = [(p, i) for p, i, r in zip(wanted, ids, rows) if r is None or pool.ids[r] != i]
        else:  # a selection written before positions were stored: by id, which must then be unique
            if len(set(pool.ids)) != len(pool.ids):
                raise ValueError(f"selection.from_run={src_run}: its {name!r} selection has no positions.npy and "
                                 f"this pool repeats ids; select again with this version")
            row_of = {i: k for k, i in enumerate(pool.ids)}
            rows = [row_of.get(i) for i in ids]
            bad = [(None, i) for i, r in zip(ids, rows) if r is None]
        if bad or source.get("of") != len(pool):
            raise ValueError(f"selection.from_run={src_run}: its {name!r} selection is over another pool "
                             f"({len(bad)} of its rows are not this pool's, e.g. position/id {bad[:1]}; pool sizes "
                             f"{source.get('of')} and {len(pool)})")
        return {**_write(out, name, np.asarray(rows, dtype=np.int64), pool), "from_run": str(src_run.resolve()),
                "source_key": source["key"]}

    return key, compute, ["data"]
