"""The ``warmup`` stage, ICONS step 1 (from LESS): LoRA on a seeded random share of the pool
(``icons.warmup``), one checkpoint per epoch with its Adam moments and average learning rate.
Data parallel under torchrun/srun: every rank trains its share of each global batch."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..distributed import is_main_process
from ..io import config_hash, write_json
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .base import load_base
from .data import data_paths, load_pool

log = logging.getLogger(__name__)


def stage_warmup(run: Run) -> dict:
    from omegaconf import OmegaConf

    from .. import tracking
    from ..models.loading import make_encoder, set_gradient_checkpointing
    from ..models.lora import add_lora
    from ..warmup import run_warmup, warmup_rows

    cfg = run.cfg
    key = config_hash({**section(cfg, "warmup", "seed"), "data": run.key_of("data"), "base": run.key_of("base"),
                       "lora": OmegaConf.to_container(cfg.model.lora, resolve=True)})
    out = run.shared("warmup", "warmup", key)

    def compute(wrun) -> dict:
        pool = load_pool(run)
        rows = warmup_rows(len(pool), cfg.warmup.fraction, cfg.seed)
        records = [pool[k] for k in rows]  # only the warmup's share is ever read
        model, tok = load_base(run)
        torch.manual_seed(cfg.seed)  # LoRA's A matrices are initialised at random
        model = add_lora(model, cfg.model.lora)
        set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
        ckpts = run_warmup(model, make_encoder(cfg.model, tok, data_paths(run).image_root), records, out,
                           cfg.warmup.epochs, cfg.warmup.batch_size, cfg.warmup.lr, cfg.seed, cfg.trainer,
                           logger=tracking.lightning_logger(wrun), stop_after=cfg.warmup.get("stop_after"))
        if is_main_process():
            write_json(out / "ids.json", [pool.ids[k] for k in rows])
            write_json(out / "positions.json", [pool.file_position(k) for k in rows])
        log.info("warmup: %d examples, %d checkpoints", len(rows), len(ckpts))
        return {"examples": len(rows), "checkpoints": ckpts}

    return cached_stage(run, "warmup", out, key, compute, pointer="warmup", inputs=["data", "base"],
                        artifact=("warmup", "warmup"), files=lambda d: [d / "ids.json", d / "positions.json", *checkpoint_dirs(d)],
                        summary=lambda m: {"warmup/examples": m["examples"], "warmup/checkpoints": len(m["checkpoints"])})


def checkpoint_dirs(wdir: Path) -> list[Path]:
    return sorted(wdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def warmup_checkpoints(run: Run) -> list[Path]:
    """The checkpoints features are taken at: the last (released ICONS) or all (LESS)."""
    ckpts = checkpoint_dirs(run.path_of("warmup"))
    return ckpts if run.cfg.warmup.checkpoints == "all" else ckpts[-1:]
