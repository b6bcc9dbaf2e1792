"""The runner: the configured stages in order, on every process of a job, with their timings.

A single process runs every stage. Under torchrun/srun, every rank joins the process group first;
the data-parallel stages (``stages.DATA_PARALLEL``) run on all ranks, each its share, the others on
rank 0 while the rest wait in a barrier; rank 0 holds the run directory's lock.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..distributed import barrier, init_distributed
from ..io import read_json, write_json
from .rundir import Run, lock_run_dir


def run_stages(cfg: DictConfig, run_dir: Path, study_dir: Path | None = None) -> dict:
    """Run ``cfg.stages`` in ``run_dir`` (shared results in ``study_dir``, default ``run_dir``);
    returns each stage's result."""
    from ..stages import DATA_PARALLEL, STAGES

    torch.set_flush_denormal(True)  # small LoRA gradients are otherwise 40-250x slower on CPU
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    run = Run(cfg, Path(run_dir), Path(study_dir or run_dir))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    rank, _ = init_distributed()  # launched by torchrun/srun: join the group (a no-op for one process)
    results = {}
    with lock_run_dir(run.run_dir) if rank == 0 else nullcontext():
        for name in cfg.stages:
            if name not in STAGES:
                raise ValueError(f"stage {name!r} is not implemented; available: {sorted(STAGES)}")
            t0 = time.time()
            if rank == 0 or name in DATA_PARALLEL:
                results[name] = STAGES[name](run)
            barrier()  # the next stage reads what this one wrote
            if rank == 0:
                timing_path = run.run_dir / "timings.json"
                timing = read_json(timing_path) if timing_path.exists() else {}
                timing[name] = round(time.time() - t0, 2)
                write_json(timing_path, timing)
    return results
