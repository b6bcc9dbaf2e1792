"""W&B helpers: offline files appear; logger=none and run=None are no-ops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icons import tracking


def test_offline_run_writes_metrics_table_and_artifact(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_cfg(["+experiment=smoke", "logger=wandb"], return_hydra_config=True)
    assert cfg.logger.mode == "offline"

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"vqav2": 0.5}')

    run = tracking.start_run(cfg, "eval", tmp_path)
    assert run is not None
    try:
        assert run.name == "smoke-eval"
        assert run.group == "smoke"
        assert run.job_type == "eval"
        assert run.config["selection"]["ratio"] == 0.2
        assert "hydra" not in run.config.keys()
        tracking.log_metrics(run, {"vqav2/acc": 0.5, "gqa/acc": 0.25})
        tracking.log_summary(run, {"relative_performance": 0.9})
        tracking.log_table(run, "eval/per_task", ["task", "score"], [["vqav2", 0.5], ["gqa", 0.25]])
        artifact = tracking.log_files(
            run, "eval/icons", "eval", [out / "metrics.json", tmp_path / "missing.json"]
        )
        assert artifact is not None and artifact.name.startswith("eval-icons")
    finally:
        tracking.finish(run)

    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, list((tmp_path / "wandb").iterdir())
    assert tracking.offline_dir(run) == run_dirs[0]
    records = list(run_dirs[0].glob("*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    assert b"vqav2/acc" in data
    assert b"eval-icons" in data  # the artifact was logged
    assert list(run_dirs[0].glob("files/media/table/**/*.table.json"))


def test_logger_none_is_a_noop(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["logger=none"])
    run = tracking.start_run(cfg, "train", tmp_path)
    assert run is None
    tracking.log_metrics(run, {"loss": 1.0})
    tracking.log_summary(run, {"loss": 1.0})
    tracking.log_table(run, "t", ["a"], [[1]])
    assert tracking.log_files(run, "x", "y", [tmp_path]) is None
    tracking.finish(run)
    assert not (tmp_path / "wandb").exists()


def test_logger_none_does_not_import_wandb(tmp_path):
    code = (
        "import sys; from omegaconf import OmegaConf; from icons import tracking;"
        "cfg = OmegaConf.create({'experiment_name': 'x', 'logger': {'kind': 'none'}});"
        "assert tracking.start_run(cfg, 's', None) is None;"
        "assert 'wandb' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_env_with_src())


def _env_with_src() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def test_disabled_mode_returns_usable_run(compose_cfg, tmp_path):
    # WANDB_MODE=disabled (autouse fixture): calls work, nothing is written
    cfg = compose_cfg()
    assert cfg.logger.mode == "disabled"
    run = tracking.start_run(cfg, "data", tmp_path)
    tracking.log_metrics(run, {"n": 1})
    tracking.log_table(run, "t", ["a"], [[1]])
    f = tmp_path / "f.txt"
    f.write_text("x")
    tracking.log_files(run, "f", "data", [f])
    tracking.finish(run)
    assert not list(tmp_path.glob("wandb/offline-run-*"))


def test_stage_run_finishes_the_run_even_when_the_stage_fails(compose_cfg, monkeypatch, tmp_path):
    from icons import tracking

    finished = []
    monkeypatch.setattr(tracking, "start_run", lambda cfg, stage, run_dir=None: f"run-{stage}")
    monkeypatch.setattr(tracking, "finish", lambda run, exit_code=None, flush_timeout=10.0: finished.append(run))
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(compose_cfg(["logger=none"]), "warmup", tmp_path) as run:
            assert run == "run-warmup"
            raise RuntimeError("boom")
    assert finished == ["run-warmup"]


def test_training_logs_loss_and_lr_live_through_lightnings_wandb_logger(compose_cfg, monkeypatch, tmp_path):
    """Warmup and training hand their W&B run to Lightning (WandbLogger): loss and learning rate
    are logged while training runs, and an offline run records its declared inputs in its config."""
    import torch

    from icons.data.encode import Encoder
    from icons.train import OptimConfig, ShuffledBatches, fit

    from .test_tiny_llava import _record
    from .tiny_lora import tiny_lora_model

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_cfg(["+experiment=smoke", "logger=wandb"])
    (tmp_path / "x.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "x.png")
    tok, model = tiny_lora_model()
    items = [Encoder(tok, 16, 32, 160, tmp_path).encode(_record("x.png"))] * 8
    run = tracking.start_run(cfg, "train-test", tmp_path)
    try:
        tracking.use_files(run, "warmup", "warmup", [tmp_path / "x.png"])
        assert run.config["inputs"] == {"warmup": "warmup"}
        torch.manual_seed(0)
        fit(model, ShuffledBatches(items, 2, 1, 0, tok.pad_token_id), OptimConfig(lr=1e-3, warmup_ratio=0.0),
            logger=tracking.lightning_logger(run), log_every=1)
    finally:
        tracking.finish(run)
    data = next(tracking.offline_dir(run).glob("*.wandb")).read_bytes()
    assert b"train/loss" in data and b"train/lr" in data


def test_artifact_of_files_with_the_same_name_keeps_them_apart(tmp_path):
    """The features stage of several warmup checkpoints logs checkpoint-<e>/meta.json for each."""
    for e in (1, 4):
        (tmp_path / f"checkpoint-{e}").mkdir()
        (tmp_path / f"checkpoint-{e}" / "meta.json").write_text(str(e))
    art = tracking.artifact("features", "features", [tmp_path / "checkpoint-1" / "meta.json",
                                                      tmp_path / "checkpoint-4" / "meta.json"])
    assert sorted(art.manifest.entries) == ["checkpoint-4/meta.json", "meta.json"]
