"""``python -m icons.run``: the Hydra entry point; runs the configured stages in order.

    python -m icons.run                                  # the embedded default (miniature study)
    python -m icons.run +experiment=llava_20pct          # a composed study
    python -m icons.run -m selection.ratio=0.1,0.2 consensus=vote,mean   # a sweep
    python -m icons.run stages=[data,base] run_dir=outputs/mine          # some stages, fixed dir
    python -m icons.run stages=[check] data=llava_json data.path=pool.jsonl   # validate your data

Exit status: 2 bad config, 1 bad input data (one line naming file, record, id, field), 3 the run
directory is in use by another run, 4 not enough resources (disk for the feature store).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from .config import CONFIG_NAME, CONFIG_PATH, ConfigError, validate  # noqa: E402

log = logging.getLogger("icons")


def check_processes(cfg: DictConfig) -> None:
    """A torchrun/srun job's processes must agree on the run directory: Hydra's default is a
    timestamp each process takes for itself."""
    from .distributed import dist_env

    world = dist_env()[1]
    if world > 1 and not cfg.run_dir:
        raise ConfigError(f"config error: run_dir=null must be set for a job of {world} processes (torchrun/srun): "
                          f"each would pick its own timestamped directory")


def quiet_libraries() -> None:
    """Lightning's and transformers' info lines (and their warnings about settings icons chose on
    purpose) would drown the pipeline's own; their warnings and errors still show."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", category=FutureWarning)


def directories(cfg: DictConfig) -> tuple[Path, Path]:
    """(run_dir, study_dir): a multirun's jobs share the sweep directory as their study."""
    hc = HydraConfig.get()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(hc.runtime.output_dir)
    study_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN and not cfg.run_dir else run_dir
    return run_dir.resolve(), study_dir.resolve()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        check_processes(cfg)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        sys.exit(2)
    quiet_libraries()
    from .data.llava_json import BadInputError
    from .io import ResourceError
    from .pipeline import RunDirLocked, run_stages

    run_dir, study_dir = directories(cfg)
    log.info("run directory: %s", run_dir)
    try:
        run_stages(cfg, run_dir, study_dir)
    except BadInputError as err:  # one line: file, record position, id, field, what is wrong
        print(f"[icons] {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RunDirLocked as err:
        print(f"[icons] {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    except ResourceError as err:  # e.g. not enough disk for the feature store: size needed and free
        print(f"[icons] {err}", file=sys.stderr, flush=True)
        sys.exit(4)
    report = run_dir / "report.md"
    if report.exists():
        print(report.read_text(), flush=True)
        log.info("report written to %s", report)


if __name__ == "__main__":
    main()
