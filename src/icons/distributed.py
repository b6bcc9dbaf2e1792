"""Processes, ranks and devices: what every stage may need under ``torchrun`` / ``srun``.

icons never lets Lightning start processes. ``torchrun --nproc-per-node=8 -m icons.run ...`` (or
``srun --ntasks=W``) starts them; :func:`init_distributed` joins the group the environment names
before any stage runs. The data-parallel stages (warmup, features, train) run on every rank, each
its share; the others run on rank 0 while the rest wait in :func:`barrier`.

On one CPU machine, :func:`spawn` starts W processes joined in a gloo group (tests, small runs).
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


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


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group named by the environment (once); no-op for a single process.
    ``timeout_s``: how long a collective may wait (``trainer.collective_timeout_s``; torch's own
    default is 10 minutes for NCCL). Returns (rank, world_size), the group's own once it is up
    (Lightning's environment for processes it did not start deletes ``WORLD_SIZE`` when a fit ends)."""
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
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **timeout)
    return rank, world


def wait_for_rank0(marker: Path, what: str, limit_s: float, poll_s: float = 1.0) -> None:
    """Wait, outside any collective, until rank 0 has written ``marker`` (``<marker>.done`` or
    ``<marker>.failed``): the rank-0-only stages (check, data, scores, select, subset, export) can
    outlast any collective timeout. Raises one line when rank 0 failed or ``limit_s`` passed."""
    done, failed = marker.with_suffix(".done"), marker.with_suffix(".failed")
    t0 = time.monotonic()
    while not done.exists():
        if failed.exists():
            raise RuntimeError(f"rank 0 failed in {what} ({failed.read_text().strip()}); this rank stops too")
        if time.monotonic() - t0 > limit_s:
            raise RuntimeError(f"waited {limit_s:.0f}s for rank 0 to finish {what} (trainer.rank0_wait_s={limit_s:g}); "
                               f"raise it if rank 0 is still working (see its log), or look for why it stopped")
        time.sleep(poll_s)


def mark_rank0(marker: Path, ok: bool, detail: str = "") -> None:
    """Rank 0's side of :func:`wait_for_rank0`."""
    from .io import atomic_write_text

    atomic_write_text(marker.with_suffix(".done" if ok else ".failed"), detail + "\n")


def shared_token(rank: int, world: int) -> str:
    """One value every rank of this job agrees on (rank 0's, broadcast): names this job's markers."""
    token = [f"{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def is_main_process() -> bool:
    """Rank 0 of the process group, or a lone process: the one that writes shared files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def compute_device(trainer_cfg=None) -> torch.device:
    """Where a stage's model runs: ``trainer.accelerator`` cpu -> CPU; gpu/cuda -> ``cuda:LOCAL_RANK``
    (an error if there is no CUDA device, rather than a silent CPU run); auto -> CUDA when
    present, else CPU."""
    acc = str(getattr(trainer_cfg, "accelerator", "cpu"))
    if acc == "cpu" or (acc == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if acc in ("gpu", "cuda", "auto"):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={acc} but torch sees no CUDA device (torch "
                             f"{torch.__version__}); use trainer=cpu")
        return torch.device("cuda", dist_env()[2] % torch.cuda.device_count())
    raise ValueError(f"trainer.accelerator={acc}: the features and eval stages run on cpu, gpu/cuda or auto")


# ---------------------------------------------------------------- the configured world
def world_size(trainer_cfg) -> int:
    """Processes a ``trainer`` config asks for: devices x nodes."""
    return int(getattr(trainer_cfg, "devices", 1)) * int(getattr(trainer_cfg, "num_nodes", 1))


def current_rank(world: int) -> int:
    """This process's rank in a ``world``-process group (0 for a single process); raises when the
    group that was launched has another size than the config says."""
    if world == 1:
        return 0
    if not dist.is_initialized() or dist.get_world_size() != world:
        launched = dist.get_world_size() if dist.is_initialized() else 1
        raise RuntimeError(f"trainer.devices x trainer.num_nodes = {world} processes, but {launched} were started")
    return dist.get_rank()


def check_launch(world: int) -> None:
    """Lightning would start the other processes itself by re-running the whole command; icons
    wants them from torchrun/srun (every stage is rank-aware, see ``pipeline.runner``)."""
    launched = dist.get_world_size() if dist.is_initialized() else dist_env()[1]
    if world > 1 and launched != world:
        raise RuntimeError(
            f"trainer.devices x trainer.num_nodes = {world} processes but {launched} started: launch with "
            f"`torchrun --nproc_per_node={world} -m icons.run ...` (one node) or `srun --ntasks-per-node=...` "
            f"(README, Reproduce the paper)")


def accumulation(global_batch: int, world: int, micro_batch: int | None = None) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for a global batch: global = micro x world x accumulation.

    ``micro_batch`` None: global / world, no accumulation. Raises ValueError (the reason, to follow
    the global batch's key and value) when the numbers do not divide."""
    if micro_batch is None:
        if global_batch % world:
            raise ValueError(f"must be a multiple of the world size {world} "
                             f"(trainer.devices x trainer.num_nodes), or set trainer.micro_batch_size")
        return global_batch // world, 1
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(f"must be a multiple of trainer.micro_batch_size x world size = {micro_batch} x "
                         f"{world} = {per_step} (world size = trainer.devices x trainer.num_nodes)")
    return micro_batch, global_batch // per_step


# ---------------------------------------------------------------- CPU processes (tests, one machine)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int | None, fn, args: tuple,
            timeout_s: float | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, args: tuple = (), threads: int | None = None, timeout_s: float | None = None) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh CPU processes joined in a gloo process
    group (``fn`` must be importable: a module-level function). ``threads``: torch threads per
    process (default: torch's own choice); ``timeout_s``: the group's collective timeout. Raises if
    any process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), threads, fn, args, timeout_s), nprocs=world, join=True)
