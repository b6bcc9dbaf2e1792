"""The check stage, the llava_json data stage and the run-directory lock (tiny files, no model work)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icons.data.llava_json import BadInputError
from icons.io import read_json, read_jsonl
from icons.pipeline import LOCK_NAME, Run, RunDirLocked, lock_run_dir, run_stages
from icons.stages import load_pool

from .conftest import compose_config
from .test_bad_input import png, rec, write_json, write_jsonl

# the smallest benchmark the pipeline tests also use: its tasks are generated in a second or two
SMALL = ["data.pool_size=240", "tasks=mini_llava_smoke", "tasks.n_val=4", "tasks.n_test=6", "logger=none"]


def _cfg(*extra: str):
    return compose_config([*SMALL, *extra])


@pytest.fixture
def user_pool(tmp_path: Path) -> Path:
    """A .jsonl pool with images under tmp/images: records 0, 3, 5 good; 1, 2, 4 bad; 3 repaired."""
    images = tmp_path / "images"
    png(images / "a.png")
    png(images / "b.png", "RGBA")
    records = [rec("u-0"), rec("u-1", image="missing.png"), {"id": "u-2", "conversations": []},
               rec("u-3", image="b.png", token=False), rec("u-0"), rec("u-5", image=None)]
    return write_jsonl(tmp_path / "pool.jsonl", records)


def test_check_stage_alone_passes_on_the_mini_llava_benchmark(tmp_path, icons_cache, caplog):
    caplog.set_level(logging.INFO, logger="icons")
    cfg = _cfg("stages=[check]")
    out = run_stages(cfg, tmp_path / "run")
    m = out["check"]
    assert m["records"] == 240 and m["ok"] == 240 and m["problems"] == 0
    assert m["with_image"] + m["text_only"] == 240 and m["text_only"] > 0
    summary = read_json(tmp_path / "run" / "check" / "summary.json")
    roles = [(f["role"], f["task"]) for f in summary["files"]]
    assert roles[0] == ("pool", None) and len(roles) == 1 + 2 * len(cfg.tasks.names)
    assert all(f["ok"] == f["records"] > 0 for f in summary["files"])
    assert (tmp_path / "run" / "check" / "problems.jsonl").read_text() == ""
    assert not (tmp_path / "run" / "data").exists()  # only the check ran
    logged = caplog.text  # logged through `logging` (the CLI shows it as "[icons] check: ...")
    assert "check: pool " in logged and "240 records" in logged and "0 problem(s)" in logged
    caplog.clear()
    run_stages(cfg, tmp_path / "run")  # rerun: the finished check is skipped
    assert "passed before" in caplog.text


def test_check_is_the_first_default_stage():
    cfg = compose_config([])
    assert list(cfg.stages)[:2] == ["check", "data"]


def test_check_stage_on_a_bad_user_pool_stops_naming_the_first_problem(tmp_path, icons_cache, user_pool, caplog):
    caplog.set_level(logging.INFO, logger="icons")
    cfg = _cfg("stages=[check,data]", "data=llava_json", f"data.path={user_pool}",
               f"data.image_root={tmp_path / 'images'}")
    with pytest.raises(BadInputError) as info:
        run_stages(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{user_pool} line 2 record 1 id 'u-1': field 'image':" in msg and "[missing_image]" in msg
    assert "(+1 more problem)" in msg and "data.on_bad_record=skip" in msg
    probs = read_jsonl(tmp_path / "run" / "check" / "problems.jsonl")
    assert [(p["position"], p["id"], p["kind"]) for p in probs] == [
        (1, "u-1", "missing_image"), (2, "u-2", "empty_conversations")]
    repeated = read_jsonl(tmp_path / "run" / "check" / "repeated_ids.jsonl")  # a label, listed, not a problem
    assert [(r["position"], r["id"], r["first_position"]) for r in repeated] == [(4, "u-0", 0)]
    assert not (tmp_path / "run" / "check" / "manifest.json").exists()  # a failed check is not 'finished'
    assert not (tmp_path / "run" / "data").exists()  # nothing after the check ran
    printed = caplog.text
    assert "6 records (4 with image, 2 text-only): 4 ok, 2 bad" in printed
    assert "problems: empty_conversations=1, missing_image=1" in printed and "repeated ids (kept): 1" in printed
    assert "1 record(s) repeat an earlier record's id" in printed and "record 4 id 'u-0' (as record 0)" in printed
    assert "repaired: image_token_inserted=1" in printed and "converted to RGB: RGBA=1" in printed


def test_skip_writes_good_records_and_bad_records_jsonl(tmp_path, icons_cache, user_pool, monkeypatch):
    from icons import tracking

    logged = {}
    monkeypatch.setattr(tracking, "log_summary", lambda run, metrics: logged.update(metrics))
    cfg = _cfg("stages=[check,data]", "data=llava_json", f"data.path={user_pool}",
               f"data.image_root={tmp_path / 'images'}", "data.on_bad_record=skip")
    out = run_stages(cfg, tmp_path / "run")
    assert out["check"]["problems"] == 2 and out["check"]["ok"] == 4 and out["check"]["repeated_ids"] == 1
    # the counts reach W&B too (by kind)
    assert logged["check/problems"] == 2 and logged["check/records"] == 6 and logged["check/repeated_ids"] == 1
    assert logged["check/problems/missing_image"] == 1 and logged["check/problems/empty_conversations"] == 1
    data = tmp_path / "run" / "data"
    pool = load_pool(Run(cfg, tmp_path / "run", tmp_path / "run"))  # read lazily from the user's file
    assert [r["id"] for r in pool] == pool.ids == ["u-0", "u-3", "u-0", "u-5"]  # ids exactly as given, file order
    assert np.load(data / "positions.npy").tolist() == [0, 3, 4, 5]
    assert pool[1]["conversations"][0]["value"].startswith("<image>\n") and pool[1]["image"] == "b.png"
    assert not (data / "pool.json").exists()  # never copied
    bad = read_jsonl(data / "bad_records.jsonl")
    assert [(b["file"], b["position"], b["line"], b["id"], b["field"], b["kind"]) for b in bad] == [
        (str(user_pool), 1, 2, "u-1", "image", "missing_image"),
        (str(user_pool), 2, 3, "u-2", "conversations", "empty_conversations")]
    m = read_json(data / "manifest.json")
    assert m["counts"]["records"] == 6 and m["counts"]["pool"] == 4 and m["counts"]["skipped"] == 2
    assert m["problems"] == {"empty_conversations": 1, "missing_image": 1}
    assert m["fixes"] == {"image_token_inserted": 1} and m["meta"] is None
    assert m["image_root"] == str(tmp_path / "images")
    # the task files come from the tasks group, with image paths that work from any image_root
    for task in cfg.tasks.names:
        for split in ("val", "test"):
            recs = read_json(m[split][task])
            assert len(recs) == m["counts"][f"{task}/{split}"] > 0
            assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in recs if "image" in r)


def test_repeated_ids_as_an_error_when_asked(tmp_path, icons_cache, user_pool):
    cfg = _cfg("stages=[check]", "data=llava_json", f"data.path={user_pool}", f"data.image_root={tmp_path / 'images'}",
               "data.repeated_ids=error")
    with pytest.raises(BadInputError) as info:
        run_stages(cfg, tmp_path / "run")
    probs = read_jsonl(tmp_path / "run" / "check" / "problems.jsonl")
    assert (4, "u-0", "duplicate_id") in [(p["position"], p["id"], p["kind"]) for p in probs]
    assert "(+2 more problems)" in str(info.value)


def test_data_stage_alone_refuses_a_bad_pool_under_error(tmp_path, icons_cache, user_pool):
    cfg = _cfg("stages=[data]", "data=llava_json", f"data.path={user_pool}",
               f"data.image_root={tmp_path / 'images'}")
    with pytest.raises(BadInputError, match=r"record 1 id 'u-1': field 'image'"):
        run_stages(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_data_stage_reads_an_edited_pool_again(tmp_path, icons_cache):
    png(tmp_path / "a.png")
    path = write_json(tmp_path / "pool.json", [rec("x0"), rec("x1")])
    cfg = _cfg("stages=[data]", "data=llava_json", f"data.path={path}")  # image_root: the file's directory
    run = Run(cfg, tmp_path / "run", tmp_path / "run")
    run_stages(cfg, run.run_dir)
    assert [r["id"] for r in load_pool(run)] == ["x0", "x1"]
    time.sleep(0.01)
    write_json(path, [rec("x0"), rec("x1"), rec("x2")])
    with pytest.raises(BadInputError, match="run the data stage again"):
        load_pool(run)  # an index of the old file is never used on the new one
    run_stages(cfg, run.run_dir)
    assert [r["id"] for r in load_pool(run)] == ["x0", "x1", "x2"]


def test_llava_json_needs_a_path():
    from icons.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"^config error: data.path=null must be set when data.kind=llava_json$"):
        validate(compose_config(["data=llava_json"]))
    obj = validate(compose_config(["data=llava_json", "data.path=/x/pool.jsonl", "data.on_bad_record=skip"]))
    assert (obj.data.kind, obj.data.path, obj.data.image_root, obj.data.on_bad_record) == (
        "llava_json", "/x/pool.jsonl", None, "skip")


# ------------------------------------------------------------------ the run-directory lock
def test_second_run_on_the_same_run_dir_stops(tmp_path):
    with lock_run_dir(tmp_path / "run"):
        assert f"pid {os.getpid()}" in (tmp_path / "run" / LOCK_NAME).read_text()
        with pytest.raises(RunDirLocked) as info:
            with lock_run_dir(tmp_path / "run"):
                pass
        msg = str(info.value)
        assert "\n" not in msg and "is in use by another icons run" in msg and f"pid {os.getpid()}" in msg
        with pytest.raises(RunDirLocked):  # through run_stages too, before any stage runs
            run_stages(_cfg("stages=[check]"), tmp_path / "run")
        assert not (tmp_path / "run" / "check").exists()
        with lock_run_dir(tmp_path / "other"):  # another directory is free
            pass
    with lock_run_dir(tmp_path / "run"):  # released on exit
        pass


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys, time; from icons.pipeline import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"):
            with lock_run_dir(run_dir):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (run_dir / LOCK_NAME).exists()  # the file stays behind; its lock died with the process
    with lock_run_dir(run_dir):
        pass


def test_command_line_exit_codes(tmp_path, icons_cache, user_pool):
    """python -m icons.run: bad input -> exit 1 and one line on stderr; a busy run_dir -> exit 3."""
    run_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "icons.run", *SMALL, "stages=[check]", "data=llava_json", f"data.path={user_pool}",
           f"data.image_root={tmp_path / 'images'}", f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with lock_run_dir(run_dir):
        busy = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert busy.returncode == 3, busy.stderr
    assert "is in use by another icons run" in busy.stderr
    bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("[icons] bad input: ") and "record 1 id 'u-1': field 'image'" in last
    assert "Traceback" not in bad.stderr
    assert json.loads((run_dir / "check" / "summary.json").read_text())["n_problems"] == 2
