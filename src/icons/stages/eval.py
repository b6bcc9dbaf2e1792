"""The ``eval`` stage, ICONS step 6's measurement: every model (the base, and each trained one)
answers every task's test split; each task's own metric scores it (``evaluate.py``). Every
generated answer is kept (``predictions.jsonl``) for error analysis."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import ConfigError
from ..io import config_hash, read_json, write_json, write_jsonl
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, section
from .base import load_base
from .data import data_paths
from .select import selector_names

log = logging.getLogger(__name__)


def evaluate_model(run: Run, model_dir: Path | None) -> dict:
    """Task -> metrics (with every prediction) of the base (``model_dir=None``) or a trained model."""
    from ..data.mini_llava import LONG_ANSWER_TASKS
    from ..distributed import compute_device
    from ..evaluate import evaluate_task
    from ..models.loading import load_model, make_encoder

    cfg = run.cfg
    model, tok = load_base(run) if model_dir is None else load_model(cfg.model, model_dir)
    model.to(compute_device(cfg.trainer))
    paths = data_paths(run)
    enc = make_encoder(cfg.model, tok, paths.image_root)
    out = {}
    for task in cfg.tasks.names:
        n_new = cfg.eval.max_new_tokens_long if task in LONG_ANSWER_TASKS else cfg.eval.max_new_tokens
        out[task] = evaluate_task(model, enc, task, read_json(paths.test[task]), n_new, cfg.eval.batch_size,
                                  cfg.trainer)
    return out


def stage_eval(run: Run) -> dict:
    from ..evaluate import chance

    cfg = run.cfg
    if cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks":  # validate() refuses this config first
        raise ConfigError("config error: the eval stage needs test splits, which tasks.kind=llava_benchmarks does "
                          "not have: evaluate the trained models with lmms-eval (README, Reproduce the paper)")
    paths = data_paths(run)
    write_json(run.run_dir / "eval" / "chance.json", {t: chance(t, read_json(paths.test[t])) for t in cfg.tasks.names})
    results = {}
    for name in ["base", *selector_names(cfg)]:
        model = "base" if name == "base" else f"train/{name}"
        model_dir = None if name == "base" else run.path_of(model) / "model"
        key = config_hash({"eval": section(cfg, "eval", "tasks"), "model": run.key_of(model), "data": run.key_of("data")})
        out = run.shared("eval", name, key)

        def compute(wrun, out=out, model_dir=model_dir) -> dict:
            metrics = evaluate_model(run, model_dir)
            write_jsonl(out / "predictions.jsonl",
                        [{"task": t, **row} for t, v in metrics.items() for row in v.pop("predictions")])
            write_json(out / "metrics.json", metrics)
            return {"scores": {t: v["score"] for t, v in metrics.items()}}

        m = cached_stage(run, f"eval-{name}", out, key, compute, pointer=f"eval/{name}", inputs=[model, "data"],
                         artifact=(f"eval-{name}", "eval"), files=lambda d: [d / "metrics.json", d / "predictions.jsonl"],
                         summary=lambda m: {f"eval/{t}": s for t, s in m["scores"].items()})
        results[name] = m
        log.info("evaluated %s in %.0fs: %s", name, m["wall_s"], " ".join(f"{t}={s:.1f}" for t, s in m["scores"].items()))
    return results
