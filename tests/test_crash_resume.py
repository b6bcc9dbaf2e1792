"""Crash and resume, for real: ``python -m icons.run`` is SIGKILLed inside warmup, feature
extraction, the baselines' forward pass and selection, then the same command is run again; the features (``pool_scores.npy``,
``pool.npy``, the done mask, the validation means), the task scores and the selection (ids,
indices) must be byte-identical to an uninterrupted run's.

The kill moment is found by polling the files each stage writes. A smoke stage is over in
milliseconds to seconds, so the crashed run sets the test hook ``ICONS_TEST_SLOW_STAGE=<stage>``
(``icons.io.slow_point``): that stage pauses ``ICONS_TEST_SLOW_S`` seconds at each step boundary
(warmup: after each epoch checkpoint; features and forward: after each batch, committed to the
done mask at once; select: after ``indices.npy``, before ``ids.json`` and the manifest). The rerun has no hook.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icons.models.base import pretrain_base

SMALL = ["data.pool_size=120", "tasks.n_val=2", "tasks.n_test=2", "warmup.epochs=2", "warmup.fraction=0.1",
         "warmup.stop_after=null",
         "model.text_hidden=64", "model.text_layers=2", "model.vision_hidden=32", "model.lora.r=4",
         "projection=rademacher", "projection.dim=64", "gradient.batch_size=16", "trainer.threads=1",
         "selectors=[icons,el2n,coincide]", "stages=[data,base,warmup,features,scores,forward,select]"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    base = root / "tiny_llava_base"
    pretrain_base(base, examples=256, batch_size=32, text_hidden=64, text_layers=2, vision_hidden=32)
    return root, base


def _command(root: Path, base: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "icons.run", "+experiment=smoke", f"run_dir={run_dir}", "logger=none", *SMALL,
            f"model.path={base}", f"cache_dir={root / 'cache'}"]


def _env(slow_stage: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICONS_TEST_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if slow_stage:
        env.update(ICONS_TEST_SLOW_STAGE=slow_stage, ICONS_TEST_SLOW_S="3")
    return env


def _run(root: Path, base: Path, run_dir: Path) -> None:
    done = subprocess.run(_command(root, base, run_dir), cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _results(run_dir: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every array and id list the pipeline computed."""
    files = [*(run_dir / "features").rglob("*.npy"), *(run_dir / "features").rglob("pool_ids.json"),
             *(run_dir / "scores").rglob("*.npy"), *(run_dir / "scores").rglob("ids.json"),
             *(run_dir / "forward").rglob("*.npy"),
             *(run_dir / "selection").rglob("*.npy"), *(run_dir / "selection").rglob("ids.json")]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(files)}


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run, shared by the three crash cases."""
    root, base = setup
    _run(root, base, root / "reference")
    res = _results(root / "reference")
    names = {Path(k).name for k in res}
    assert {"pool_scores.npy", "pool.npy", "pool_done.npy", "val_means.npy", "task_scores.npy", "indices.npy",
            "ids.json", "pool_el2n.npy", "pool_coincide.npy"} <= names
    return res


def _features_half_done(run_dir: Path) -> bool:
    return _half_done(run_dir, "features/*/checkpoint-*/pool_done.npy")


def _half_done(run_dir: Path, pattern: str) -> bool:
    for mask in run_dir.glob(pattern):
        try:
            done = np.load(mask)
        except (ValueError, OSError, EOFError):
            continue
        if 0 < done.sum() < done.size:
            return True
    return False


# stage -> (the moment to kill: some of the stage's work is on disk, not all; the stage's manifest)
CASES = {
    "warmup": (lambda d: any((d / "warmup").glob("*/checkpoint-1/checkpoint.json")), "warmup/*/manifest.json"),
    "features": (_features_half_done, "features/*/manifest.json"),
    "forward": (lambda d: _half_done(d, "forward/warmup-*/pool_done.npy"), "forward/warmup-*/manifest.json"),
    "select": (lambda d: (d / "selection" / "icons" / "indices.npy").exists(), "selection/icons/manifest.json"),
}


@pytest.mark.parametrize("stage", list(CASES))
def test_sigkill_mid_stage_then_rerun_gives_identical_results(setup, reference, stage):
    root, base = setup
    run_dir = root / f"crash-{stage}"
    ready, manifest = CASES[stage]
    proc = subprocess.Popen(_command(root, base, run_dir), cwd=root, env=_env(stage), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ready(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before the {stage} stage was under way: "
                            f"{proc.stderr.read()[-2000:]}")
            assert time.time() < deadline, f"{stage}: no sign of progress in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not list(run_dir.glob(manifest)), f"the run was not killed inside {stage}"
    if stage == "warmup":  # as if killed while writing the next checkpoint: half a file in its partial dir
        wdir = next((run_dir / "warmup").iterdir())
        (wdir / ".checkpoint-2.partial").mkdir(exist_ok=True)
        (wdir / ".checkpoint-2.partial" / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        first = (wdir / "checkpoint-1" / "lora.safetensors").stat().st_mtime_ns
    if stage in ("features", "forward"):
        pattern = "features/*/checkpoint-*/pool_done.npy" if stage == "features" else "forward/warmup-*/pool_done.npy"
        done = np.load(next(run_dir.glob(pattern)))
        assert 0 < done.sum() < done.size  # the rerun resumes a partly-filled store

    _run(root, base, run_dir)  # the same command again

    got = _results(run_dir)
    assert sorted(got) == sorted(reference)
    differ = [k for k in reference if got[k] != reference[k]]
    assert not differ, f"not byte-identical after a kill in {stage}: {differ}"
    if stage == "warmup":
        wdir = next((run_dir / "warmup").iterdir())
        assert sorted(p.name for p in wdir.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
        # resumed after epoch 1 (its checkpoint kept, not retrained), yet byte-identical above
        assert (wdir / "checkpoint-1" / "lora.safetensors").stat().st_mtime_ns == first
    ids = json.loads((run_dir / "selection" / "icons" / "ids.json").read_text())
    assert len(ids) == int(0.2 * 120)


# what a run may write: nothing that would be unpickled when read back (see test_safe_loading.py)
SAFE_SUFFIXES = {".json", ".jsonl", ".npy", ".safetensors", ".md", ".yaml", ".txt", ".png", ".lock", ".model"}


def test_run_writes_only_safe_formats_and_no_temp_files(setup, reference):
    run_dir = setup[0] / "reference"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    unsafe = [str(p.relative_to(run_dir)) for p in files if p.suffix not in SAFE_SUFFIXES]
    assert not unsafe, f"files in a non-safe format: {unsafe}"
    partial = [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if ".partial" in p.name
               or p.name.startswith(tuple(f".{q.name}." for q in files))]
    assert not partial, f"temporary files left by a finished run: {partial}"
