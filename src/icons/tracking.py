"""Weights & Biases helpers: one run per stage, offline by default, never an API key.

Every function accepts ``run=None`` (``logger.kind=none``) and then does nothing,
so stage code can call them unconditionally::

    run = tracking.start_run(cfg, "eval", run_dir)
    tracking.log_metrics(run, {"vqav2/acc": 0.41})
    tracking.log_table(run, "eval/per_task", ["task", "score"], [["vqav2", 0.41]])
    tracking.log_files(run, "eval-icons", "eval", [run_dir / "eval" / "icons"])   # an output
    tracking.use_files(run, "model-icons", "model", [model_dir])                   # an input (lineage)
    tracking.finish(run)

W&B itself is imported lazily, so ``logger=none`` never imports it.
"""

import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "artifact",
    "config_dict",
    "finish",
    "lightning_logger",
    "log_files",
    "log_images",
    "log_metrics",
    "log_summary",
    "log_table",
    "offline_dir",
    "start_run",
    "stage_run",
    "use_files",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def _as_dictconfig(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.structured(cfg)
    return OmegaConf.create(cfg)


def config_dict(cfg: Any) -> dict:
    """The config as a plain dict for ``wandb.config`` (resolved, without the ``hydra`` node)."""
    node = _as_dictconfig(cfg)
    keys = [k for k in node.keys() if k != "hydra"]
    node = OmegaConf.masked_copy(node, keys)
    try:
        out = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra app
        out = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    assert isinstance(out, dict)
    return out


def _main_process() -> bool:
    """Data-parallel jobs log from rank 0 only (no torch import when nothing imported it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def start_run(cfg: Any, stage: str, run_dir: Optional[PathLike] = None) -> Optional[Any]:
    """Start a W&B run for one stage; None when ``logger.kind == "none"``.

    ``cfg`` is the composed config (DictConfig, RootConfig or mapping). The run
    is named ``<experiment_name>-<stage>``, grouped by ``logger.group`` (default
    ``experiment_name``), has ``job_type=stage`` and the resolved config. Files go
    to ``logger.dir`` or ``run_dir`` (W&B creates ``wandb/`` inside it).
    An ``online`` run that cannot start (no credentials, no network) falls back
    to ``offline`` with a warning.
    """
    c = _as_dictconfig(cfg)
    logger_cfg = c.logger
    if logger_cfg.kind == "none" or not _main_process():
        return None

    import wandb

    experiment = str(c.get("experiment_name") or "default")
    overrides = sweep_overrides()
    directory = logger_cfg.dir or (str(run_dir) if run_dir is not None else None)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    mode = str(logger_cfg.mode)
    kwargs: dict[str, Any] = dict(
        project=str(logger_cfg.project),
        group=str(logger_cfg.group or experiment),
        job_type=stage,
        name=f"{experiment}-{stage}" + (f"[{','.join(overrides)}]" if overrides else ""),
        tags=[str(t) for t in (logger_cfg.tags or [])] or None,
        config=config_dict(c),
        dir=directory,
        reinit="create_new",
    )
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as err:  # noqa: BLE001
        if mode != "online":
            raise
        log.warning("wandb online run failed to start (%s); logging offline instead", err)
        return wandb.init(mode="offline", **kwargs)


def log_metrics(run: Optional[Any], metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
    """``run.log(metrics)`` (history); no-op for ``run=None``."""
    if run is None or not metrics:
        return
    run.log(dict(metrics), step=step)


def log_summary(run: Optional[Any], metrics: Mapping[str, Any]) -> None:
    """Set summary values (final per-task scores, relative performance)."""
    if run is None or not metrics:
        return
    run.summary.update(dict(metrics))


def log_table(
    run: Optional[Any],
    key: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> None:
    """Log a ``wandb.Table`` under ``key``; no-op for ``run=None``."""
    if run is None:
        return
    import wandb

    table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
    run.log({key: table})


def _artifact_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    return cleaned[:128] or "artifact"


#: files larger than this (and directories holding more) enter an artifact as references to their
#: local path, not as copies: a 7B checkpoint or a 665K-record subset is never duplicated
COPY_LIMIT = 64 << 20


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def artifact(name: str, type: str, paths: Iterable[PathLike], metadata: Optional[Mapping[str, Any]] = None):
    """A ``wandb.Artifact`` of files and directories (missing ones skipped with a warning; large
    ones as ``file://`` references without checksums); None when nothing exists. The same paths
    give the same artifact (digest), which is how a later stage declares it as its input."""
    import wandb

    art = wandb.Artifact(_artifact_name(name), type=type, metadata=dict(metadata or {}))
    added, used = 0, set()
    for p in paths:
        path = Path(p)
        if not path.exists():
            log.warning("artifact %s: %s does not exist; skipped", name, path)
            continue
        # a file name the artifact has already (checkpoint-1/meta.json, checkpoint-4/meta.json) keeps its folder
        entry = path.name if path.name not in used else f"{path.parent.name}/{path.name}"
        used.add(entry)
        if _size(path) > COPY_LIMIT:
            art.add_reference(path.resolve().as_uri(), name=entry, checksum=False)
        elif path.is_dir():
            art.add_dir(str(path), name=entry)
        else:
            art.add_file(str(path), name=entry)
        added += 1
    return art if added else None


def log_files(
    run: Optional[Any],
    name: str,
    type: str,
    paths: Iterable[PathLike],
    metadata: Optional[Mapping[str, Any]] = None,
    aliases: Optional[Sequence[str]] = None,
) -> Optional[Any]:
    """Log files and directories as one artifact (an output of ``run``). Returns the artifact,
    or None when ``run`` is None or nothing was added."""
    if run is None:
        return None
    art = artifact(name, type, paths, metadata)
    if art is None:
        return None
    run.log_artifact(art, aliases=list(aliases) if aliases else None)
    return art


def is_offline(run: Optional[Any]) -> bool:
    return getattr(getattr(run, "settings", None), "mode", None) == "offline"


def use_files(run: Optional[Any], name: str, type: str, paths: Iterable[PathLike]) -> Optional[Any]:
    """Declare the artifact of these files (as an earlier stage logged it) an input of ``run``,
    so W&B's lineage graph links the two stages. W&B refuses ``use_artifact`` offline; an offline
    run records its inputs in its config (``inputs``) instead, and ``wandb sync`` then shows the
    stages side by side without the edge (run online for the graph)."""
    if run is None:
        return None
    art = artifact(name, type, paths)
    if art is None:
        return None
    if is_offline(run):
        inputs = dict(run.config.get("inputs") or {})
        inputs[art.name] = type
        run.config.update({"inputs": inputs}, allow_val_change=True)
        return art
    return run.use_artifact(art)


def log_images(run: Optional[Any], images: Mapping[str, PathLike]) -> None:
    """PNG figures as ``wandb.Image`` (key -> file)."""
    if run is None or not images:
        return
    import wandb

    run.log({k: wandb.Image(str(p)) for k, p in images.items()})


def lightning_logger(run: Optional[Any]):
    """Lightning's ``WandbLogger`` around an open stage run (None -> no logger)."""
    if run is None:
        return False
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(experiment=run)


def sweep_overrides() -> list[str]:
    """The job's Hydra overrides that name it in a sweep (not run_dir or hydra's own); [] outside
    a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        task = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra app running
        return []
    return [o for o in task if not o.startswith(("run_dir=", "hydra.", "logger."))]


@contextmanager
def stage_run(cfg: Any, stage: str, run_dir: Optional[PathLike] = None) -> Iterator[Optional[Any]]:
    """``start_run`` ... ``finish`` around a block: the run is finished even when the block raises."""
    run = start_run(cfg, stage, run_dir)
    try:
        yield run
    finally:
        finish(run)


def offline_dir(run: Optional[Any]) -> Optional[Path]:
    """The local run directory (``.../wandb/offline-run-*``) of an offline run, else None."""
    if run is None:
        return None
    settings = getattr(run, "settings", None)
    if getattr(settings, "mode", None) != "offline" or not getattr(settings, "sync_dir", None):
        return None
    return Path(settings.sync_dir)


def finish(run: Optional[Any], exit_code: Optional[int] = None, flush_timeout: float = 10.0) -> None:
    """Finish the run; no-op for ``run=None``.

    wandb-core writes an offline run's ``.wandb`` transaction log shortly *after*
    ``run.finish()`` returns (seen with wandb 0.31 when artifacts are logged), so
    for offline runs this waits up to ``flush_timeout`` seconds until the file
    holds more than its 7-byte header and stops growing. Everything is on disk
    when this returns (for ``wandb sync`` or a test reading it).
    """
    if run is None:
        return
    sync_file = None
    if offline_dir(run) is not None:
        sync_file = getattr(run.settings, "sync_file", None)
    run.finish(exit_code=exit_code)
    if sync_file and flush_timeout > 0:
        _wait_for_flush(Path(sync_file), flush_timeout)


def _wait_for_flush(path: Path, timeout: float, header: int = 7) -> None:
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else 0
        if size > header and size == last:
            return
        last = size
        time.sleep(0.05)
    log.warning("wandb offline log %s not flushed after %.0fs", path, timeout)
