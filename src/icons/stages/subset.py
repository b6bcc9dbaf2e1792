"""The ``subset`` stage, ICONS step 5's output: each selection as ``subset.json``, the selected
pool records exactly as they were read (a drop-in LLaVA training file), and its composition by
family next to the pool's (``subset.py``)."""
from __future__ import annotations

import numpy as np

from ..io import read_json, read_jsonl
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run
from .data import data_paths, load_pool
from .select import selector_names


def stage_subset(run: Run) -> dict:
    from ..subset import write_subset

    results = {}
    pool = load_pool(run)
    paths = data_paths(run)
    meta = read_jsonl(paths.meta) if paths.meta and paths.meta.exists() else None
    for name in selector_names(run.cfg):
        if name == "full":
            continue
        sel = run.run_dir / "selection" / name
        sub = sel / "subset"
        results[name] = cached_stage(
            run, f"subset-{name}", sub, read_json(sel / "manifest.json")["key"],
            lambda wrun, sel=sel, sub=sub: write_subset(pool, np.load(sel / "indices.npy"), read_json(sel / "ids.json"),
                                                        meta, sub),
            pointer=f"subset/{name}", inputs=[f"select/{name}", "data"], artifact=(f"subset-{name}", "subset"),
            files=lambda d: sorted(d.glob("*.json")))
    return results
