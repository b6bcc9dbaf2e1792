"""The ``train`` stage, ICONS step 6: the base fine-tuned on each selection (``full``: the whole
pool) with identical settings (``train.py``); each model is shared by the runs whose training key
matches. Data parallel under torchrun/srun (``trainer=ddp|fsdp``)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data.encode import LazyEncoded
from ..data.pool import LazyPool
from ..distributed import barrier, is_main_process
from ..io import config_hash
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .base import load_base
from .data import data_paths, load_pool
from .select import selector_names

log = logging.getLogger(__name__)


def selection_rows(run: Run, name: str, pool: LazyPool) -> list[int]:
    """The pool rows a selector chose (``full``: every row), from its ``indices.npy``."""
    if name == "full":
        return list(range(len(pool)))
    path = run.run_dir / "selection" / name / "indices.npy"
    if not path.exists():
        raise FileNotFoundError(f"no selection {name!r}: {path} (run the select stage first)")
    return np.load(path).tolist()


def rows_key(pool: LazyPool, rows: list[int]) -> dict:
    """What identifies a set of rows in a training key: their ids and, when the pool repeats ids
    (then an id list names no one set of records), their positions too."""
    ids = [pool.ids[k] for k in rows]
    key = {"ids": config_hash(ids)}
    if len(set(pool.ids)) != len(pool.ids):
        key["positions"] = config_hash([pool.file_position(k) for k in rows])
    return key


def train_model(run: Run, records: list[dict], out: Path, logger=False) -> dict:
    """Fine-tune the base on ``records`` and save it to ``out/model``; what the manifest says."""
    from ..models.loading import make_encoder, save_model, set_gradient_checkpointing
    from ..train import OptimConfig, batches_for, fit, set_trainable

    cfg = run.cfg
    model, tok = load_base(run)
    enc = make_encoder(cfg.model, tok, data_paths(run).image_root)
    torch.manual_seed(cfg.seed)
    if cfg.train.mode == "lora":
        from ..models.lora import add_lora

        model = add_lora(model, cfg.model.lora)
        set_trainable(model, "lora", projector=cfg.train.projector_lr is not None)
    else:
        set_trainable(model, "full")
    set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
    items = LazyEncoded(records, enc)
    batches = batches_for(items, cfg.train.batch_size, cfg.train.epochs, cfg.seed, tok.pad_token_id, cfg.trainer)
    optim = OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, warmup_ratio=cfg.train.warmup_ratio,
                        scheduler=cfg.train.scheduler, grad_clip=cfg.train.grad_clip, loss=cfg.train.loss,
                        projector_lr=cfg.train.projector_lr)
    torch.manual_seed(cfg.seed)
    module = fit(model, batches, optim, cfg.trainer, logger=logger, label=f"train {out.name}",
                 log_every=cfg.train.log_every)
    if is_main_process():  # data parallel: rank 0 holds the whole trained model (also under FSDP)
        if cfg.train.mode == "lora":
            model = model.merge_and_unload()
        save_model(cfg.model, model, tok, out / "model")
    barrier()
    losses = module.losses
    k = max(1, len(losses) // 50)
    curve = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]
    return {"examples": len(records), "steps": len(losses), "loss_first": curve[0], "loss_last": curve[-1],
            "truncated": items.truncated}


def stage_train(run: Run) -> dict:
    from .. import tracking

    cfg = run.cfg
    pool = load_pool(run)
    results = {}
    for name in selector_names(cfg):
        rows = selection_rows(run, name, pool)
        # the data key too: the ids (e.g. pool-000000...) stay the same when the pool's content changes
        key = config_hash({**section(cfg, "train", "seed"), "base": run.key_of("base"), "data": run.key_of("data"),
                           **rows_key(pool, rows)})
        out = run.shared("train", name, key)

        def compute(wrun, out=out, rows=rows, name=name) -> dict:
            info = train_model(run, [pool[k] for k in rows], out, tracking.lightning_logger(wrun))
            log.info("trained %s: %d examples, loss %.3f -> %.3f", name, info["examples"], info["loss_first"],
                     info["loss_last"])
            return {"selector": name, **info}

        results[name] = cached_stage(
            run, f"train-{name}", out, key, compute, pointer=f"train/{name}",
            inputs=["base", "data" if name == "full" else f"subset/{name}"], artifact=(f"model-{name}", "model"),
            files=lambda d: [d / "model", d / "manifest.json"],
            summary=lambda m: {f"train/{k}": v for k, v in m.items() if k not in ("key", "selector")})
    return results
