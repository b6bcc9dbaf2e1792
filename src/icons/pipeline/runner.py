"""The runner: the configured stages in order, on every process of a job, with their timings.

A single process runs every stage. Under torchrun/srun, every rank joins the process group first;
the data-parallel stages (``stages.DATA_PARALLEL``) run on all ranks, each its share, and end in a
barrier. The others run on rank 0 alone while the rest wait for a marker file, not in a collective
(checking 665K records with their images outlasts any collective timeout); rank 0 holds the run
directory's lock.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..distributed import barrier, init_distributed, mark_rank0, shared_token, wait_for_rank0
from ..io import read_json, write_json
from .rundir import Run, lock_run_dir


def run_stages(cfg: DictConfig, run_dir: Path, study_dir: Path | None = None) -> dict:
    """Run ``cfg.stages`` in ``run_dir`` (shared results in ``study_dir``, default ``run_dir``);
    returns each stage's result."""
    from ..stages import DATA_PARALLEL, STAGES

    torch.set_flush_denormal(True)  # small LoRA gradients are otherwise 40-250x slower on CPU
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    run = Run(cfg, Path(run_dir), Path(study_dir or run_dir), runner=run_stages)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # launched by torchrun/srun: join the group (a no-op for one process)
    rank, world = init_distributed(timeout_s=cfg.trainer.get("collective_timeout_s"))
    markers = run.run_dir / ".ranks" / shared_token(rank, world)
    results = {}
    with lock_run_dir(run.run_dir) if rank == 0 else nullcontext():
        for name in cfg.stages:
            if name not in STAGES:
                raise ValueError(f"stage {name!r} is not implemented; available: {sorted(STAGES)}")
            t0 = time.time()
            out = run_stage(lambda name=name: STAGES[name](run), name in DATA_PARALLEL, rank, world,
                            markers / name, f"stage {name}", cfg.trainer.get("rank0_wait_s", 86400))
            if out is not None:
                results[name] = out
            if rank == 0:
                timing_path = run.run_dir / "timings.json"
                timing = read_json(timing_path) if timing_path.exists() else {}
                timing[name] = round(time.time() - t0, 2)
                write_json(timing_path, timing)
    return results


def run_stage(fn, parallel: bool, rank: int, world: int, marker: Path, what: str, wait_s: float):
    """One stage on this rank: every rank runs a data-parallel one, then all meet in a barrier;
    rank 0 alone runs any other while the rest wait for its marker (``distributed.wait_for_rank0``),
    so that no collective waits for it. Returns the stage's result (None where it did not run)."""
    if parallel or world == 1:
        out = fn()
        barrier()  # the next stage reads what this one wrote
        return out
    if rank != 0:
        wait_for_rank0(marker, what, wait_s)
        return None
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = fn()
    except BaseException as err:
        mark_rank0(marker, False, f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    mark_rank0(marker, True)
    return out
