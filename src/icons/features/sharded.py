"""Data-parallel feature extraction: W processes share one pool store, each writing its own rows.

``extract(..., rank=r, world_size=W)`` takes every W-th batch of the global, length-sorted batch
plan and writes its rows in place into the shared memory-mapped ``pool_scores.npy`` /
``pool.npy`` / ``pool_done.npy`` (see ``extract.extract``). Nothing is merged afterwards and no
collective is needed besides a final barrier; an interrupted job (any rank) resumes from the
done mask, with the same or another W (the plan does not depend on W, so the bytes do not).

Launching:

- CPU, one machine: ``spawn(fn, world_size, args)`` starts W processes with
  ``torch.multiprocessing`` and a gloo process group (``fn(rank, world_size, *args)``).
- ``torchrun --nproc-per-node=8 ...``: every process reads ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` (``dist_env``); ``init_distributed()`` joins the group (nccl on GPU, gloo on
  CPU) and selects ``cuda:LOCAL_RANK``; then call ``extract_distributed``. ``run_stages`` joins
  the group when those variables are set, so ``torchrun --nproc-per-node=8 -m icons.run ...``
  runs feature extraction (and warmup and training, ``parallel.py``) on 8 GPUs; the other stages
  run on rank 0 while the rest wait.
- SLURM: ``srun --ntasks=W`` sets ``SLURM_PROCID`` / ``SLURM_NTASKS``, read as rank / world size
  (set ``MASTER_ADDR`` / ``MASTER_PORT`` for the process group, as for any torch.distributed
  job). A SLURM *array* without a process group works too: each task runs
  ``extract(rank=i, world_size=W)``; the last one to finish writes ``meta.json``.
- Lightning (``trainer=ddp``): inside a ``LightningModule`` the same call with
  ``rank=trainer.global_rank, world_size=trainer.world_size`` (Lightning has set up the group).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from ..io import read_json


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
    or SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) variables; (0, 1, 0) when
    neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group named by the environment (once); no-op for a single process.
    Returns (rank, world_size), the group's own once it is up (Lightning's environment for
    processes it did not start deletes ``WORLD_SIZE`` when a fit ends)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world


def compute_device(trainer_cfg=None) -> torch.device:
    """Where the stages that run outside Lightning (features, eval) put the model:
    ``trainer.accelerator`` cpu -> CPU; gpu/cuda -> ``cuda:LOCAL_RANK`` (an error if there is no
    CUDA device, rather than a silent CPU run); auto -> CUDA when present, else CPU."""
    acc = str(getattr(trainer_cfg, "accelerator", "cpu"))
    if acc == "cpu" or (acc == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if acc in ("gpu", "cuda", "auto"):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={acc} but torch sees no CUDA device (torch "
                             f"{torch.__version__}); use trainer=cpu")
        return torch.device("cuda", dist_env()[2] % torch.cuda.device_count())
    raise ValueError(f"trainer.accelerator={acc}: the features and eval stages run on cpu, gpu/cuda or auto")


def is_main_process() -> bool:
    """Rank 0 of the process group, or a lone process: the one that writes shared files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def extract_distributed(*args, rank: int | None = None, world_size: int | None = None, **kwargs) -> dict:
    """``extract`` for this process's share, then wait for every rank (if a process group is up).
    Returns the finished store's ``meta.json`` (plus this rank's ``rows_done``); raises if rows
    are still missing after the barrier (a rank failed)."""
    from .extract import extract

    if rank is None or world_size is None:
        rank, world_size, _ = dist_env()
    meta = extract(*args, rank=rank, world_size=world_size, **kwargs)
    barrier()
    out_dir = Path(args[4] if len(args) > 4 else kwargs["out_dir"])
    if not meta["complete"]:
        if not (out_dir / "meta.json").exists():
            raise RuntimeError(f"{out_dir}: pool rows are still missing after every rank finished "
                               f"(world_size={world_size}); rerun to resume")
        meta = {**read_json(out_dir / "meta.json"), "complete": True, "rank": rank, "rows_done": meta["rows_done"]}
    return meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int | None, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, args: tuple = (), threads: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh CPU processes joined in a gloo
    process group (``fn`` must be importable: a module-level function). ``threads``: torch threads
    per process (default: torch's own choice). Raises if any process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
