"""The miniature study (+experiment=miniature_study): its configs compose, its computations against
hand-worked cases, and the whole study at smoke size (two seeds, one ratio, one feature recipe)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from icons.config import validate
from icons.pipeline import run_stages
from icons.study import analyses as A
from icons.study.driver import plan, sub_config

from .conftest import compose_config
from .test_pipeline import _cfg, smoke_base  # noqa: F401 - the smoke-size base fixture


def test_the_study_composes_into_its_sub_runs():
    cfg = compose_config(["+experiment=miniature_study"])
    validate(cfg)
    assert list(cfg.stages) == ["check", "study"]
    subs = {s.name: s for s in plan(cfg)}
    assert list(subs) == ["seed-0", "seed-1", "seed-2", "ratio-0.05", "ratio-0.1", "ratio-0.4", "ratio-0.6",
                          "features-adam", "features-less_last", "features-less"]
    first = sub_config(cfg, subs["seed-0"])
    assert first.selectors[:5] == ["full", "random", "icons", "resample", "round_robin"]
    assert "mean" in first.selectors and "specialist-llavaw" in first.selectors
    assert "full" not in sub_config(cfg, subs["seed-1"]).selectors and sub_config(cfg, subs["seed-2"]).seed == 2
    less = sub_config(cfg, subs["features-less"])
    assert (less.warmup.fraction, less.warmup.epochs, less.warmup.stop_after) == (0.05, 4, None)
    assert (less.warmup.checkpoints, less.gradient.kind) == ("all", "adam")
    assert (first.warmup.stop_after, first.gradient.kind, sub_config(cfg, subs["features-adam"]).gradient.kind) == (
        0.1, "sgd", "adam")
    assert sub_config(cfg, subs["ratio-0.05"]).selection.ratio == 0.05


def test_top_masks_and_overlaps_by_hand():
    scores = np.array([[5, 1], [4, 2], [3, 5], [2, 4], [1, 3]], dtype=float)
    masks = A.top_masks(scores, 0.4)  # two rows each: task 0 rows 0, 1; task 1 rows 2, 3
    assert masks.tolist() == [[True, True, False, False, False], [False, False, True, True, False]]
    names, m = A.overlap_matrix({"a": np.array([0, 1, 2, 3]), "b": np.array([2, 3, 4, 0])})
    assert names == ["a", "b"] and m.tolist() == [[100.0, 75.0], [75.0, 100.0]]
    corr = A.pair_correlations(scores, ["t0", "t1"])
    # deviations (2, 1, 0, -1, -2) and (-2, -1, 2, 1, 0): sum of products -6, sums of squares 10 and 10
    assert corr[("t0", "t1")] == pytest.approx(-0.6)
    s = A.seed_summary([60.0, 64.0, 62.0])
    assert (s["mean"], s["std"], s["min"], s["max"]) == (62.0, 2.0, 60.0, 64.0)


def test_goal_check_by_hand():
    from icons.study.report import goal_check

    def row(rel, **tasks):
        return {"rel": A.seed_summary(rel), "tasks": {t: A.seed_summary(v) for t, v in tasks.items()}}

    summary = {"random": row([70.0, 72.0, 74.0], a=[50.0, 52.0, 54.0], b=[10.0, 10.0, 10.0]),  # rel 72 ± 2
               "x": row([76.0, 77.0, 78.0], a=[60.0, 60.0, 60.0], b=[5.0, 6.0, 7.0]),  # rel 77 ± 1; b 6 ± 1
               "y": row([76.0, 77.0, 78.0], a=[60.0, 60.0, 60.0], b=[9.0, 10.0, 11.0])}
    x = goal_check(summary, "x")  # margin 5 > spread max(1, 2); b: 10 - 6 = 4 > max(1, 0)
    assert (x["margin"], x["spread"], x["below"], x["met"]) == (5.0, 2.0, {"b": 4.0}, False)
    assert goal_check(summary, "y")["met"] and not goal_check(summary, "random")["met"]


def test_the_study_at_smoke_size(tmp_path, smoke_base):  # noqa: F811
    cfg = _cfg(tmp_path, smoke_base, "stages=[check,study]", "experiment_name=study", "study.seeds=[0,1]",
               "tasks.names=[vqav2,pope,mmbench_en,mmbench_cn]",
               "study.ratios=[0.4]", "study.aggregation=[mean]")
    cfg.study.feature_choices = {"adam": ["gradient.kind=adam"]}  # a Hydra override would merge into the defaults
    out = run_stages(cfg, tmp_path / "run")["study"]
    assert sorted(out["subruns"]) == ["features-adam", "ratio-0.4", "seed-0", "seed-1"]
    data = json.loads((tmp_path / "run" / "study.json").read_text())
    assert set(data["summary"]) == {"full", "random", "icons", "resample", "round_robin"}
    assert len(data["summary"]["icons"]["rel"]["values"]) == 2 and len(data["summary"]["full"]["rel"]["values"]) == 1
    assert len(data["specialists"]) == len(cfg.tasks.names)
    assert data["aggregation_overlap"]["names"][:2] == ["vote", "mean"]
    assert set(data["ratio"]["icons"]) == {"0.2", "0.4"} and "adam" in data["features"]
    report = (tmp_path / "run" / "study_report.md").read_text()
    for heading in ("## Main table", "## Specialist against generalist", "## Aggregation", "## Selection ratio",
                    "## Per-task top-20% overlap", "## Feature recipes"):
        assert heading in report
    assert all((tmp_path / "run" / "plots" / f).is_file() for f in ("ratio.png", "top20_overlap.png", "rel.png"))
    # the sub-runs share the first seed's warmup and features (one of each per seed and recipe)
    assert len(list((tmp_path / "run" / "warmup").glob("warmup-*"))) == 2
    assert len(list((tmp_path / "run" / "features").glob("features-*"))) == 3
