"""The run directory: its lock, the stage manifests and the pointers to the results a run used.

Two directories: ``run_dir`` (this job: data and base pointers, selections, subsets, report) and
``study_dir`` (content-addressed results that several jobs can share: warmup, features, scores,
trained models and their evaluations, each under ``<stage>/<name>-<key>``). A single run uses its
run directory for both; the jobs of a Hydra multirun share the sweep directory as their study.

Every stage result is a directory with a ``manifest.json`` written last (key, wall time, what the
stage reports). ``<run_dir>/stages.json`` points each stage name of this run at the (possibly
shared) result it used: ``{"warmup": {"key": ..., "path": ..., "wall_s": ...}, ...}``.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ..distributed import is_main_process
from ..io import read_json, write_json

MANIFEST = "manifest.json"
POINTERS = "stages.json"
LOCK_NAME = ".icons.lock"


@dataclass
class Run:
    """One job: its config, its run directory and the study directory it shares results in;
    ``runner``: the function that runs a config's stages (a stage that runs sub-runs calls it)."""

    cfg: DictConfig
    run_dir: Path
    study_dir: Path
    runner: Callable | None = None

    def shared(self, stage: str, name: str, key: str) -> Path:
        """Where a content-addressed result lives: ``<study_dir>/<stage>/<name>-<key>``."""
        return self.study_dir / stage / f"{name}-{key}"

    def pointers(self) -> dict:
        p = self.run_dir / POINTERS
        return read_json(p) if p.exists() else {}

    def record(self, stage: str, manifest: dict, path: Path, **extra) -> dict:
        """Remember in ``stages.json`` which result this run used for ``stage`` (rank 0 writes)."""
        if is_main_process():
            table = self.pointers()
            table[stage] = {"key": manifest["key"], "path": str(path), "wall_s": manifest.get("wall_s", 0.0), **extra}
            write_json(self.run_dir / POINTERS, table)
        return manifest

    def key_of(self, stage: str) -> str:
        """The key of an earlier stage's result."""
        return self.pointers()[stage]["key"]

    def path_of(self, stage: str) -> Path:
        """The directory of an earlier stage's result."""
        return Path(self.pointers()[stage]["path"])


#: settings added after results were cached: in a key only when set to something else, so that results
#: made before they existed (with the behaviour of these defaults) are still found
LATER_DEFAULTS = {"data": {"repeated_ids": "warn"}, "warmup": {"stop_after": None}}


def section(cfg: DictConfig, *keys: str) -> dict:
    """Plain values of some root sections of the config (the parts a stage key depends on)."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}
    for k, later in LATER_DEFAULTS.items():
        if isinstance(out.get(k), dict):
            for name, default in later.items():
                if name in out[k] and out[k][name] == default:
                    out[k].pop(name)
    return out


# ---------------------------------------------------------------- manifests
def finished(stage_dir: Path, key: str) -> dict | None:
    """The manifest of ``stage_dir`` if it holds a result of ``key``, else None."""
    p = stage_dir / MANIFEST
    if p.exists():
        m = read_json(p)
        if m.get("key") == key:
            return m
    return None


def write_manifest(stage_dir: Path, key: str, t0: float, **info) -> dict:
    """The manifest of a finished result (written last, atomically; rank 0 writes)."""
    m = {"key": key, "wall_s": round(time.time() - t0, 2), **info}
    if is_main_process():
        write_json(stage_dir / MANIFEST, m)
    return m


# ---------------------------------------------------------------- one run per run directory
class RunDirLocked(RuntimeError):
    """Another icons run holds the run directory. ``str(err)`` is one line."""


@contextmanager
def lock_run_dir(run_dir: Path):
    """Hold an exclusive ``fcntl.flock`` on ``<run_dir>/.icons.lock`` for the whole run.

    A second run pointed at the same directory stops at once with :class:`RunDirLocked`. The
    kernel drops the lock when its holder exits, however it exits, so a killed run leaves a lock
    file but never a stale lock (the file is kept; only the lock on it counts)."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another process (or another open of this file)
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise RunDirLocked(f"run directory {run_dir} is in use by another icons run ({holder}; lock {path}); "
                           f"wait for it to finish or choose another run_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
