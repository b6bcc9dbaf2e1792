"""The ``report`` stage: per-task test scores by model, relative performance, subset composition,
wall times (``report.py``), as markdown, JSON, figures and a W&B table."""
from __future__ import annotations

import logging
import time

from ..pipeline.rundir import Run

log = logging.getLogger(__name__)


def stage_report(run: Run) -> dict:
    from ..report import write_report

    from .select import selector_names

    t0 = time.time()
    path = write_report(run, ["base", *selector_names(run.cfg)])
    log.info("report: %s", path)
    return {"report": str(path), "wall_s": round(time.time() - t0, 2)}
