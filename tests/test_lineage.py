"""W&B lineage: every stage declares the artifacts it reads (use_artifact) and logs the one it
writes, cached stages included, so the dashboard's graph runs pool -> warmup -> features -> scores ->
selection -> subset -> model -> evaluation -> report. A recording stand-in for an online W&B run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from icons import tracking
from icons.pipeline import run_stages

from .test_pipeline import _cfg, smoke_base  # noqa: F401 - the smoke-size base fixture


class Recorder:
    """What a stage does with its W&B run: inputs used, outputs logged (names of artifacts)."""

    runs: list["Recorder"] = []

    def __init__(self, stage: str):
        self.stage, self.used, self.logged = stage, [], []
        self.settings = SimpleNamespace(mode="online")
        self.config, self.summary = {}, {}
        Recorder.runs.append(self)

    def use_artifact(self, art):
        self.used.append(art.name)
        return art

    def log_artifact(self, art, aliases=None):
        self.logged.append(art.name)

    def log(self, *args, **kwargs):
        pass

    def finish(self, exit_code=None):
        pass


def _graph() -> dict[str, tuple[list, list]]:
    out = {r.stage: (sorted(r.used), sorted(r.logged)) for r in Recorder.runs}
    Recorder.runs.clear()
    return out


def test_every_stage_declares_what_it_reads_cached_or_not(tmp_path, smoke_base, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tracking, "start_run", lambda cfg, stage, run_dir=None: Recorder(stage))
    monkeypatch.setattr(tracking, "lightning_logger", lambda run: False)
    cfg = _cfg(tmp_path, smoke_base)
    want = {
        "data": ([], ["pool"]),
        "base": ([], ["base"]),
        "warmup": (["base", "pool"], ["warmup"]),
        "features": (["pool", "warmup"], ["features"]),
        "scores": (["features"], ["scores"]),
        "select-icons": (["scores"], ["selection-icons"]),
        "select-random": (["pool"], ["selection-random"]),
        "select-resample": (["scores"], ["selection-resample"]),
        "subset-icons": (["pool", "selection-icons"], ["subset-icons"]),
        "train-full": (["base", "pool"], ["model-full"]),
        "train-icons": (["base", "subset-icons"], ["model-icons"]),
        "eval-icons": (["model-icons", "pool"], ["eval-icons"]),
        "eval-base": (["base", "pool"], ["eval-base"]),
        "report": (["eval-base", "eval-full", "eval-icons", "eval-random", "eval-resample"], ["report"]),
    }
    for attempt in ("computed", "cached"):
        run_stages(cfg, tmp_path / "run")
        graph = _graph()
        for stage, edges in want.items():
            assert graph[stage] == edges, (attempt, stage, graph[stage])


def test_offline_run_records_its_inputs_in_the_config(monkeypatch, tmp_path):
    """W&B refuses use_artifact offline; the inputs are kept in the run's config instead."""
    (tmp_path / "f.txt").write_text("x")
    run = Recorder("s")
    run.settings.mode = "offline"
    run.config = SimpleNamespace(data={}, get=lambda k, d=None: run.config.data.get(k, d),
                                 update=lambda d, allow_val_change=False: run.config.data.update(d))
    tracking.use_files(run, "warmup", "warmup", [tmp_path / "f.txt"])
    assert run.used == [] and run.config.data["inputs"] == {"warmup": "warmup"}
    pytest.importorskip("wandb")
