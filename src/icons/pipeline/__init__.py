"""Running the pipeline: the run directory (lock, manifests, pointers), the one cached-stage helper
every stage uses, and the runner that takes the configured stages in order."""
from .rundir import LOCK_NAME, Run, RunDirLocked, finished, lock_run_dir, section, write_manifest
from .runner import run_stages

__all__ = ["LOCK_NAME", "Run", "RunDirLocked", "finished", "lock_run_dir", "run_stages", "section", "write_manifest"]
