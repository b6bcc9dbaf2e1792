"""The whole pipeline at smoke size: runs, resumes, and selects the same rows for the same seed."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icons.models.base import pretrain_base
from icons.pipeline import run_stages

from .conftest import REPO_ROOT, compose_config

TINY = ["+experiment=smoke", "data.pool_size=240", "tasks.n_val=4", "tasks.n_test=6", "warmup.epochs=2",
        "warmup.fraction=0.1", "warmup.stop_after=null", "train.epochs=1", "eval.max_new_tokens_long=12",
        "model.text_hidden=64", "model.text_layers=2", "model.vision_hidden=32", "model.lora.r=4", "logger=none"]


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    """The stage-1 base script at smoke size (the shipped base is made by the same function)."""
    out = tmp_path_factory.mktemp("base") / "tiny_llava_base"
    pretrain_base(out, examples=256, batch_size=32, text_hidden=64, text_layers=2, vision_hidden=32)
    meta = json.loads((out / "icons_base.json").read_text())
    assert meta["recipe"]["examples"] == 256 and meta["loss_curve"][-1] < meta["loss_curve"][0]
    return out


def _cfg(tmp_path, base, *extra):
    return compose_config([*TINY, f"model.path={base}", f"cache_dir={tmp_path / 'cache'}", *extra])


def test_pipeline_runs_and_is_deterministic(tmp_path, smoke_base):
    runs = []
    for name in ("a", "b"):
        cfg = _cfg(tmp_path, smoke_base)
        run_stages(cfg, tmp_path / name)
        runs.append(tmp_path / name)
    a, b = runs
    ids_a = json.loads((a / "selection" / "icons" / "ids.json").read_text())
    assert ids_a == json.loads((b / "selection" / "icons" / "ids.json").read_text())
    assert len(ids_a) == int(0.2 * 240)
    for p in ("features", "scores"):  # byte-identical features and scores
        fa = sorted((a / p).rglob("*.npy"))
        assert fa and [f.read_bytes() for f in fa] == [(b / f.relative_to(a)).read_bytes() for f in fa]
    report = (a / "report.md").read_text()
    for row in ("| chance |", "| base |", "| full |", "| random |", "| icons |"):
        assert row in report
    subset = json.loads((a / "selection" / "icons" / "subset" / "subset.json").read_text())
    assert [r["id"] for r in subset] == ids_a and all("conversations" in r for r in subset)
    comp = json.loads((a / "selection" / "icons" / "subset" / "composition.json").read_text())
    assert comp["subset"]["n"] == len(ids_a) and abs(sum(comp["pool"]["family"].values()) - 1) < 1e-3
    # every generated answer is kept: one row per test record, one per rotation for MMBench
    stages = json.loads((a / "stages.json").read_text())
    rows = [json.loads(line) for line in (Path(stages["eval/full"]["path"]) / "predictions.jsonl").open()]
    cfg = _cfg(tmp_path, smoke_base)
    for task in cfg.tasks.names:
        test = json.loads(Path(json.loads((a / "data" / "manifest.json").read_text())["test"][task]).read_text())
        want = sum(len(r["options"]) for r in test) if task.startswith("mmbench") else len(test)
        got = [r for r in rows if r["task"] == task]
        assert len(got) == want and all({"id", "prediction", "reference", "hit"} <= set(r) for r in got)
    metrics = json.loads((Path(stages["eval/full"]["path"]) / "metrics.json").read_text())
    hits = [r["hit"] for r in rows if r["task"] == "vqav2"]
    assert metrics["vqav2"]["score"] == pytest.approx(100 * sum(hits) / len(hits))


def test_rerun_skips_finished_stages_and_consensus_change_reuses_features(tmp_path, smoke_base):
    cfg = _cfg(tmp_path, smoke_base, "selectors=[random,icons]", "stages=[data,base,warmup,features,scores,select,subset]")
    run_stages(cfg, tmp_path / "r")
    feat = next((tmp_path / "r" / "features").iterdir())
    stamp = (feat / "manifest.json").stat().st_mtime_ns
    cfg2 = _cfg(tmp_path, smoke_base, "selectors=[random,icons]", "consensus=mean", "selection.ratio=0.1",
                "stages=[data,base,warmup,features,scores,select,subset]")
    run_stages(cfg2, tmp_path / "r")
    assert (feat / "manifest.json").stat().st_mtime_ns == stamp  # not recomputed
    mean_ids = json.loads((tmp_path / "r" / "selection" / "mean" / "ids.json").read_text())
    assert len(mean_ids) == 24
    scores = np.load(next((tmp_path / "r" / "scores").iterdir()) / "task_scores.npy")
    assert scores.shape == (240, 10) and np.isfinite(scores).all()


def test_changed_pool_retrains_in_the_same_run_dir(tmp_path, smoke_base, monkeypatch):
    """The full model's ids (pool-000000...) are the same for any pool: a new data seed or a new
    generator must still give a new data stage and a new trained model, never the old one."""
    import importlib

    build = importlib.import_module("icons.data.mini_llava.build")  # the package re-exports build()
    stages = ["selectors=[full]", "stages=[data,base,select,subset,train]"]
    keys = []
    for extra, version in (([], build.GENERATOR_VERSION), (["data.seed=1"], build.GENERATOR_VERSION),
                           (["data.seed=1"], build.GENERATOR_VERSION + 1)):
        monkeypatch.setattr(build, "GENERATOR_VERSION", version)
        run_stages(_cfg(tmp_path, smoke_base, *stages, *extra), tmp_path / "r")
        done = json.loads((tmp_path / "r" / "stages.json").read_text())
        keys.append((done["data"]["key"], done["train/full"]["key"]))
        assert Path(done["train/full"]["path"], "manifest.json").exists()
    assert len({k[0] for k in keys}) == 3 and len({k[1] for k in keys}) == 3


def test_different_seed_changes_warmup_subset(tmp_path, smoke_base):
    ids = []
    for seed in (0, 1):
        cfg = _cfg(tmp_path, smoke_base, f"seed={seed}", "stages=[data,base,warmup]")
        run_stages(cfg, tmp_path / f"s{seed}")
        ids.append(json.loads(next((tmp_path / f"s{seed}" / "warmup").iterdir()).joinpath("ids.json").read_text()))
    assert ids[0] != ids[1] and len(ids[0]) == len(ids[1]) == 24


def test_command_line_entry_point(tmp_path, smoke_base):
    """`python -m icons.run` from another working directory, and a bad value stops in one line."""
    env_cmd = [sys.executable, "-m", "icons.run", *TINY, f"model.path={smoke_base}", f"cache_dir={tmp_path / 'c'}",
               "stages=[data,base]", f"run_dir={tmp_path / 'cli'}"]
    done = subprocess.run(env_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cli" / "data" / "manifest.json").exists()
    bad = subprocess.run([*env_cmd, "selection.ratio=1.5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "config error: selection.ratio=1.5 must be in (0, 1]"


def test_multirun_shares_features_across_jobs(tmp_path, smoke_base):
    """`-m selection.ratio=0.1,0.2 consensus=vote,mean`: features once, a selection per job."""
    cmd = [sys.executable, "-m", "icons.run", "-m", *TINY, f"model.path={smoke_base}", f"cache_dir={tmp_path / 'c'}",
           "stages=[data,base,warmup,features,scores,select,subset]", "selectors=[icons]",
           "selection.ratio=0.1,0.2", "consensus=vote,mean", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert len(list((sweep / "features").iterdir())) == 1  # computed once for four jobs
    assert len(list((sweep / "warmup").iterdir())) == 1
    sizes = {}
    for job in range(4):
        sel = next((sweep / str(job) / "selection").iterdir())
        sizes[(job, sel.name)] = len(json.loads((sel / "ids.json").read_text()))
    assert sorted(sizes.values()) == [24, 24, 48, 48]
    assert {name for _, name in sizes} == {"icons", "mean"}


def test_warmup_rows_keep_pool_order_and_follow_the_seed():
    """The warmup's share is a seeded sample of rows (ids may repeat: rows never do)."""
    from icons.warmup import warmup_rows

    picked = warmup_rows(40, 0.25, seed=1)
    assert len(picked) == 10 and picked == sorted(set(picked)) and all(0 <= k < 40 for k in picked)
    assert warmup_rows(40, 0.25, seed=1) == picked and warmup_rows(40, 0.25, seed=2) != picked
    assert warmup_rows(3, 0.01, seed=0) and len(warmup_rows(3, 0.01, seed=0)) == 1  # at least one row
