"""The ``features`` stage, ICONS step 2: per-example gradient features of every pool and validation
example at each warmup checkpoint (``features/extract.py``), plain as in the released ICONS code
(``gradient=adam``: Adam-preconditioned for the pool, LESS), optionally projected. Data parallel
under torchrun/srun: each rank writes its rows of one shared, pre-allocated store; a killed run
resumes from its done mask."""
from __future__ import annotations

import logging

from ..distributed import compute_device, init_distributed
from ..io import config_hash
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .base import load_base
from .data import data_paths, load_pool, load_val
from .warmup import warmup_checkpoints

log = logging.getLogger(__name__)


def stage_features(run: Run) -> dict:
    from ..features.extract import extract_distributed
    from ..models.loading import make_encoder
    from ..models.lora import add_lora
    from ..warmup import load_checkpoint

    cfg = run.cfg
    from ..influence import ADAM_FORM

    key = config_hash({**section(cfg, "gradient", "projection", "warmup"), "warmup": run.key_of("warmup"),
                       "tasks": section(cfg, "tasks"), **({"adam": ADAM_FORM} if cfg.gradient.kind == "adam" else {})})
    out = run.shared("features", "features", key)

    def compute(wrun) -> dict:
        pool, val = load_pool(run), load_val(run)
        rank, world = init_distributed()
        device = compute_device(cfg.trainer)
        metas = {}
        for ckpt in warmup_checkpoints(run):
            model, tok = load_base(run)
            model = add_lora(model, cfg.model.lora)
            moments = load_checkpoint(model, ckpt)
            model.to(device).eval()
            meta = extract_distributed(model, make_encoder(cfg.model, tok, data_paths(run).image_root), pool, val,
                                       out / ckpt.name, moments if cfg.gradient.kind == "adam" else None,
                                       cfg.projection.kind, cfg.projection.dim, cfg.projection.seed,
                                       cfg.gradient.batch_size, cfg.projection.dtype, rank=rank, world_size=world,
                                       max_tokens=cfg.gradient.max_tokens, trainer_cfg=cfg.trainer,
                                       checkpointing=cfg.model.gradient_checkpointing)
            meta = {k: v for k, v in meta.items() if k not in ("complete", "rank", "rows_done")}
            metas[ckpt.name] = dict(meta, avg_lr=moments[2]["avg_lr"])
            log.info("features at %s: %d pool + %d val, grad dim %d, %s -> %d in %.0fs", ckpt.name, meta["n_pool"],
                     meta["n_val"], meta["grad_dim"], meta["projection"]["kind"], meta["projection"]["dim"],
                     meta["wall_s"])
        return {"checkpoints": metas}

    return cached_stage(run, "features", out, key, compute, pointer="features", inputs=["warmup", "data"],
                        artifact=("features", "features"),
                        files=lambda d: [d / "manifest.json", *sorted(d.glob("*/meta.json")), *sorted(d.glob("*/groups.json"))],
                        summary=lambda m: {"features/grad_dim": next(iter(m["checkpoints"].values()))["grad_dim"]})
