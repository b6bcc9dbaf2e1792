"""The ``study`` stage: the paper's analyses on the miniature, as sub-runs of the pipeline.

Each sub-run is this run's config with a few settings changed, run by the ordinary runner in its
own directory under ``<run_dir>/study/`` and sharing this run's results by key (warmup, features,
scores and the full-data model are computed once):

- ``seed-<s>``: the main table, ``study.selectors`` at every seed (and full data at the first, the
  reference of every seed's relative performance, unless ``study.full_every_seed``); at the first
  seed also the aggregation ablation (``study.aggregation``) and each task's specialist;
- ``ratio-<r>``: random and icons at other selection ratios (first seed);
- ``features-<name>``: icons with another feature recipe (``study.feature_choices``; first seed).

Then :mod:`icons.study.report` reads them all and writes the study's report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ..pipeline.rundir import Run

log = logging.getLogger(__name__)

#: the stages of a sub-run (the check ran once, before the study)
SUB_STAGES = ["data", "base", "warmup", "features", "scores", "forward", "select", "subset", "train", "eval", "report"]


@dataclass
class SubRun:
    name: str
    kind: str  # seed | ratio | features
    overrides: dict = field(default_factory=dict)
    selectors: list[str] = field(default_factory=list)


def plan(cfg: DictConfig) -> list[SubRun]:
    """The sub-runs a study config asks for, in the order they run (the first seed first)."""
    st = cfg.study
    first = st.seeds[0]
    tasks = list(cfg.tasks.names)
    subs = []
    for s in st.seeds:
        sel = list(st.selectors)
        if s == first or st.full_every_seed:
            sel = ["full", *sel]
        if s == first:
            sel += list(st.aggregation) + ([f"specialist-{t}" for t in tasks] if st.specialists else [])
        subs.append(SubRun(f"seed-{s}", "seed", {"seed": s}, _unique(sel)))
    for r in st.ratios:
        subs.append(SubRun(f"ratio-{r:g}", "ratio", {"seed": first, "selection.ratio": float(r)}, ["random", "icons"]))
    for name, overrides in st.feature_choices.items():
        pairs = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
        subs.append(SubRun(f"features-{name}", "features", {"seed": first, **pairs}, ["icons"]))
    return subs


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def sub_config(cfg: DictConfig, sub: SubRun) -> DictConfig:
    """``cfg`` with the sub-run's settings (a full pipeline without the study stage), validated."""
    from ..config import validate

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in sub.overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    out.stages = list(SUB_STAGES)
    out.selectors = sub.selectors
    out.consensus.method = "vote"  # the icons row is ICONS; other consensuses are their own selectors
    # W&B: the sub-run's runs are named after it and grouped with the study's
    out.logger.group = cfg.logger.group or cfg.experiment_name
    out.experiment_name = f"{cfg.experiment_name}-{sub.name}"
    validate(out)
    return out


def stage_study(run: Run) -> dict:
    from .report import write_study_report

    subs = plan(run.cfg)
    done, cfgs = {}, {}
    for k, sub in enumerate(subs, 1):
        cfg = cfgs[sub.name] = sub_config(run.cfg, sub)
        log.info("study: %s (%d of %d): %s", sub.name, k, len(subs), ", ".join(cfg.selectors))
        run.runner(cfg, run.run_dir / "study" / sub.name, run.study_dir)
        done[sub.name] = str(run.run_dir / "study" / sub.name)
    path = write_study_report(run, subs, cfgs)
    log.info("study: report %s", path)
    return {"subruns": done, "report": str(path)}


def sub_dirs(run_dir: Path, subs: list[SubRun]) -> dict[str, Path]:
    return {s.name: run_dir / "study" / s.name for s in subs}
