"""The ``forward`` stage: the per-example values the configured baseline selectors read
(``icons.selectors``), one store per model: ``base`` (pool and validation sets), ``warmup`` (the
last warmup checkpoint; pool) and ``clip`` (``selector.clip_score.model``; pool). A run whose
selectors need none of them does nothing here. Data parallel under torchrun/srun like the
gradient features: each rank fills its batches of one shared store; a killed run resumes."""
from __future__ import annotations

import logging

from ..config.selector import CLIP_NEEDS_A_MODEL
from ..distributed import barrier, compute_device, init_distributed
from ..io import config_hash
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .base import load_base
from .data import data_paths, load_pool, load_val

log = logging.getLogger(__name__)


def stage_forward(run: Run) -> dict:
    from ..selectors import stores_needed

    return {which: _store(run, which) for which in stores_needed(run.cfg.selectors)}


def _store(run: Run, which: str) -> dict:
    cfg = run.cfg
    sel = section(cfg, "selector")["selector"]
    if which == "clip":
        if not sel["clip_score"]["model"]:
            raise ValueError(f"selectors {CLIP_NEEDS_A_MODEL}")
        made = {"clip": sel["clip_score"]["model"]}
        inputs = ["data"]
    else:
        made = {"model": run.key_of("base" if which == "base" else "warmup"), "dtype": sel["dtype"],
                "layers": sel["coincide"]["layers"] if which == "base" else []}
        inputs = ["data", "base" if which == "base" else "warmup"]
    key = config_hash({"store": which, **made, "data": run.key_of("data"),
                       **({"tasks": section(cfg, "tasks")} if which == "base" else {})})
    out = run.shared("forward", which, key)

    def compute(wrun) -> dict:
        from ..selectors.store import rows_missing

        rank, world = init_distributed()
        device = compute_device(cfg.trainer)
        pool = load_pool(run)
        made_here = {"store": which, "key": key}
        if which == "clip":
            from ..selectors.clip import fill_clip_store

            res = {"pool": fill_clip_store(made["clip"], pool, data_paths(run).image_root, out, made_here,
                                           sel["clip_score"]["batch_size"], device, rank, world, cfg.trainer)}
        else:
            res = _fill(run, which, pool, out, made_here, rank, world, device)
        barrier()
        missing = [name for name in res if rows_missing(out, name)]
        if missing:
            raise RuntimeError(f"{out}: {', '.join(missing)} rows still missing after every rank finished; "
                               f"rerun to resume")
        log.info("forward %s: %s", which, ", ".join(f"{k} {v['rows_done']} rows in {v['wall_s']:.0f}s"
                                                   for k, v in res.items()))
        return {"store": which, "n_pool": len(pool), "sets": {k: {"wall_s": v["wall_s"]} for k, v in res.items()}}

    return cached_stage(run, f"forward-{which}", out, key, compute, pointer=f"forward/{which}", inputs=inputs,
                        artifact=(f"forward-{which}", "forward"),
                        files=lambda d: [d / "manifest.json", *sorted(d.glob("*_meta.json"))])


def _fill(run: Run, which: str, pool, out, made: dict, rank: int, world: int, device) -> dict:
    from ..models.loading import make_encoder
    from ..models.lora import add_lora
    from ..selectors.forward import coincide_layers, fill_store
    from ..warmup import load_checkpoint
    from .warmup import checkpoint_dirs

    cfg = run.cfg
    model, tok = load_base(run)
    if which == "warmup":  # EL2N early in training: the warmup's last checkpoint
        model = add_lora(model, cfg.model.lora)
        load_checkpoint(model, checkpoint_dirs(run.path_of("warmup"))[-1])
    model.to(device).eval()
    enc = make_encoder(cfg.model, tok, data_paths(run).image_root)
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = coincide_layers(n_layers, cfg.selector.coincide.layers) if which == "base" else []
    s = cfg.selector
    sets = {"pool": pool, **({"val": load_val(run)} if which == "base" else {})}
    return {name: fill_store(model, enc, recs, out, name, made, layers, s.dtype, s.batch_size, s.max_tokens,
                             rank, world, cfg.trainer) for name, recs in sets.items()}


def forward_stores(run: Run) -> dict:
    """{model: store directory} of the forward stores this run made or reused."""
    from pathlib import Path

    return {k.split("/", 1)[1]: Path(v["path"]) for k, v in run.pointers().items() if k.startswith("forward/")}
