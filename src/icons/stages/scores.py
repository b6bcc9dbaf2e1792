"""The ``scores`` stage, ICONS step 3 (the specialist): each pool example's mean cosine to each
task's validation gradients (``influence.py``), checkpoints weighted by their average learning
rate, MME-like tasks the max over their sub-tasks -> ``task_scores.npy`` (N x K)."""
from __future__ import annotations

import numpy as np

from ..io import config_hash, read_json, save_npy, write_json
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run


def stage_scores(run: Run) -> dict:
    from ..features.store import check_feature_dirs, load_group_scores
    from ..influence import MERGE, combine_checkpoints, task_table

    cfg = run.cfg
    fdir = run.path_of("features")
    key = config_hash({"features": run.key_of("features")})
    out = run.shared("scores", "scores", key)

    def compute(wrun) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        fman = read_json(fdir / "manifest.json")
        check_feature_dirs([fdir / name for name in fman["checkpoints"]])  # one projection for pool, val, checkpoints
        per_ckpt, lrs = [], []
        for name, meta in fman["checkpoints"].items():
            s, groups, ids = load_group_scores(fdir / name)
            per_ckpt.append(s)
            lrs.append(meta["avg_lr"])
        combined = combine_checkpoints(per_ckpt, lrs)
        tasks = list(cfg.tasks.names)
        save_npy(out / "task_scores.npy", task_table(combined, groups, tasks).astype(np.float32))
        save_npy(out / "merge_scores.npy", combined[:, groups.index(MERGE)].astype(np.float32))
        write_json(out / "ids.json", ids)
        write_json(out / "tasks.json", tasks)
        write_json(out / "weights.json", dict(zip(fman["checkpoints"], (np.asarray(lrs) / sum(lrs)).tolist())))
        return {"n": len(ids), "tasks": tasks}

    return cached_stage(run, "scores", out, key, compute, pointer="scores", inputs=["features"],
                        artifact=("scores", "scores"),
                        files=lambda d: [d / "task_scores.npy", d / "ids.json", d / "tasks.json"])


def load_scores(run: Run) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """(task scores N x K, merge scores N, pool ids, task names) of this run's scores stage."""
    d = run.path_of("scores")
    return (np.load(d / "task_scores.npy"), np.load(d / "merge_scores.npy"), read_json(d / "ids.json"),
            read_json(d / "tasks.json"))
