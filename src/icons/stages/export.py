"""The ``export`` stage, the evaluation hand-off: each trained model as a merged HF LLaVA checkpoint
for lmms-eval's ``llava_hf``, with the command that evaluates it on the paper's ten benchmarks
(``export.py``); shared like the model it comes from."""
from __future__ import annotations

import logging

from ..io import config_hash
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run
from .base import load_base
from .select import icons_name

log = logging.getLogger(__name__)


def stage_export(run: Run) -> dict:
    from ..export import FORMAT, export_trained, model_image_processor, write_command

    cfg = run.cfg
    wanted = cfg.export.selectors if cfg.export.selectors is not None else cfg.selectors
    trained = run.pointers()
    results = {}
    for name in [icons_name(cfg) if s == "icons" else s for s in wanted]:
        if f"train/{name}" not in trained:
            raise FileNotFoundError(f"no trained model {name!r} in {run.run_dir}: run the train stage first")
        key = config_hash({"train": trained[f"train/{name}"]["key"], "format": FORMAT})  # train's key covers the model
        out = run.shared("export", name, key)

        def compute(wrun, name=name, out=out, key=key) -> dict:
            info = export_trained(run.path_of(f"train/{name}") / "model", out, key, cfg.model.template,
                                  model_image_processor(cfg.model), base=lambda: load_base(run))
            return {k: v for k, v in info.items() if k not in ("key", "wall_s")}

        m = cached_stage(run, f"export-{name}", out, key, compute, pointer=f"export/{name}", inputs=[f"train/{name}"],
                         artifact=(f"export-{name}", "export"), files=lambda d: [d])
        # the command follows export.lmms_tasks / num_processes, which the checkpoint does not depend on
        cmd = write_command(out, list(cfg.export.lmms_tasks), cfg.export.num_processes)
        results[name] = {**m, "lmms_eval": cmd}
        log.info("exported %s (%s) to %s; evaluate with:\n  %s", name, m["dtype"], out, cmd)
    return results
