"""The one helper every stage runs through: skip if the manifest matches, else compute; either way
one W&B run that declares the stage's inputs and logs its outputs.

    m = cached_stage(run, "scores", out, key, compute, pointer="scores", inputs=["features"],
                     artifact=("scores", "scores"), files=lambda out: [out / "task_scores.npy"])

``compute(wandb_run) -> dict`` writes the stage's files (each atomically) and returns what its
manifest should say; the manifest is written last, so a stage killed midway leaves no manifest and
runs again (resuming where it can: warmup from its last epoch checkpoint, features from the done
mask). ``pointer`` names the result in ``stages.json`` and with it the artifact later stages
declare as their input (``inputs``), so the dashboard's lineage graph follows the pipeline, cached
stages included.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import tracking
from .rundir import Run, finished, write_manifest

log = logging.getLogger(__name__)


def declare_inputs(wandb_run: Any, run: Run, inputs: Sequence[str]) -> None:
    """``use_artifact`` of the artifacts that earlier stages recorded under these pointers."""
    if wandb_run is None:
        return
    table = run.pointers()
    for name in inputs:
        art = table.get(name, {}).get("artifact")
        if art:
            tracking.use_files(wandb_run, art["name"], art["type"], art["files"])


def cached_stage(run: Run, job: str, out: Path, key: str, compute: Callable[[Any], dict], *,
                 pointer: str | None = None, inputs: Sequence[str] = (),
                 artifact: tuple[str, str] | None = None, files: Callable[[Path], list[Path]] | None = None,
                 summary: Callable[[dict], dict] | None = None) -> dict:
    """The result of one stage (its manifest): reused when ``out`` holds one of ``key``, else
    computed. ``job`` names the W&B run (``<experiment>-<job>``) and the log lines; ``artifact``
    is the (name, type) of the output artifact made of ``files(out)``; ``summary(manifest)`` the
    run's summary metrics."""
    manifest = finished(out, key)
    with tracking.stage_run(run.cfg, job, run.run_dir) as wrun:
        declare_inputs(wrun, run, inputs)
        if manifest is None:
            t0 = time.time()
            manifest = write_manifest(out, key, t0, **compute(wrun))
        else:
            log.info("%s: reused %s (same key %s)", job, out, key)
        paths = [str(p) for p in (files(out) if files else [out / "manifest.json"])]
        if artifact is not None:
            tracking.log_files(wrun, artifact[0], artifact[1], paths)
        if summary is not None:
            tracking.log_summary(wrun, summary(manifest))
    if pointer is not None:
        extra = {"artifact": {"name": artifact[0], "type": artifact[1], "files": paths}} if artifact else {}
        run.record(pointer, manifest, out, **extra)
    return manifest
