"""``tasks=llava_benchmarks``: the converter's output (built by the real converter on the fixtures
of test_converters.py) read as the pipeline's validation sets, ids and groups kept; the clear
errors for a missing file; eval refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from icons.config import ConfigError, validate
from icons.data.benchmarks import convert
from icons.data.llava_json import BadInputError
from icons.influence import group_of
from icons.io import read_json
from icons.pipeline import Run, run_stages
from icons.stages import load_val, stage_eval

from .conftest import compose_config
from .test_bad_input import png, rec, write_jsonl
from .test_converters import _mme, _mmbench, _png, _vqav2

TASKS = ["vqav2", "mme", "mmbench_en"]


@pytest.fixture
def bench(tmp_path: Path) -> dict:
    """Three tasks' validation sets from the real converter; images where LLaVA keeps them."""
    root = tmp_path / "playground"  # the image root: coco/..., MME_Benchmark_release_version/...
    out = root / "icons_val"
    convert("vqav2", _vqav2(tmp_path / "src", "val2014"), out, n=4, seed=0)
    for r in json.loads((out / "vqav2.json").read_text()):
        _png(root / r["image"])
    convert("mme", [_mme(root)], out, n=8, seed=0, holdout=True)
    convert("mmbench_en", [_mmbench(tmp_path / "src", "mmbench_dev_20230712.tsv")], out, n=3, seed=0, holdout=True)
    png(root / "coco" / "train2017" / "a.png")
    pool = write_jsonl(root / "pool.jsonl", [rec("p0", image="coco/train2017/a.png"), rec("p1", image=None),
                                             rec("p2", image="coco/train2017/a.png")])
    return {"root": root, "out": out, "pool": pool}


def _cfg(bench: dict, *extra: str):
    return compose_config(["logger=none", "tasks=llava_benchmarks", f"tasks.dir={bench['out']}",
                           f"tasks.names=[{','.join(TASKS)}]", "data=llava_json", f"data.path={bench['pool']}",
                           f"data.image_root={bench['root']}", "stages=[check,data]", *extra])


def test_validation_sets_come_from_the_converter_files_with_ids_and_groups(tmp_path, bench):
    cfg = _cfg(bench)
    validate(cfg)
    run = Run(cfg, tmp_path / "run", tmp_path / "run")
    out = run_stages(cfg, run.run_dir)
    assert out["check"]["problems"] == 0
    summary = read_json(run.run_dir / "check" / "summary.json")
    assert [(f["role"], f["task"]) for f in summary["files"]] == [("pool", None)] + [("val", t) for t in TASKS]
    val = load_val(run)
    written = {t: json.loads((bench["out"] / f"{t}.json").read_text()) for t in TASKS}
    assert [r["id"] for r in val] == [r["id"] for t in TASKS for r in written[t]]  # ids as the converter wrote
    groups = {group_of(r) for r in val}
    assert groups == {"vqav2", "mme/count", "mme/landmark", "mmbench_en"}
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in val)
    # MMBench's images were written under tasks.dir (its meta says so); the others are under data.image_root
    mmb = [r for r in val if r["task"] == "mmbench_en"]
    assert all(Path(r["image"]).parent == bench["out"] / "mmbench_en_images" for r in mmb)
    m = read_json(run.run_dir / "data" / "manifest.json")
    assert m["test"] == {} and m["counts"]["mme/val"] == len(written["mme"])


def test_missing_validation_file_names_it_and_the_converter_command(tmp_path, bench):
    cfg = _cfg(bench, "tasks.names=[vqav2,gqa]")
    with pytest.raises(BadInputError) as info:
        run_stages(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"bad input: {bench['out'] / 'gqa.json'}: ")
    assert f"python -m icons.data.benchmarks gqa --src ... --out {bench['out']}" in msg and "[missing_file]" in msg


def test_a_file_of_another_task_is_refused(tmp_path, bench):
    (bench["out"] / "gqa.json").write_text((bench["out"] / "vqav2.json").read_text())  # saved under a wrong name
    with pytest.raises(BadInputError, match=r"gqa.json: none of its 4 records is usable"):
        run_stages(_cfg(bench, "tasks.names=[gqa]"), tmp_path / "run")
    probs = [json.loads(line) for line in (tmp_path / "run" / "check" / "problems.jsonl").read_text().splitlines()]
    assert [(p["field"], p["kind"]) for p in probs[:4]] == [("task", "wrong_task")] * 4
    assert "names task 'vqav2', but this is the 'gqa' file" in probs[0]["message"]


def test_invalid_meta_file_is_named(tmp_path, bench):
    (bench["out"] / "mme.meta.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"mme.meta.json: .*converter's meta JSON.*\[invalid_json_file\]"):
        run_stages(_cfg(bench), tmp_path / "run")


def test_config_needs_dir_and_refuses_eval():
    with pytest.raises(ConfigError, match=r"^config error: tasks.dir=null must be set when tasks.kind=llava_bench"):
        validate(compose_config(["tasks=llava_benchmarks", "stages=[check]"]))
    with pytest.raises(ConfigError, match=r"contains eval and report, which tasks.kind=llava_benchmarks cannot run.*"
                                          r"lmms-eval"):
        validate(compose_config(["tasks=llava_benchmarks", "tasks.dir=/x"]))  # the default stages end with both
    with pytest.raises(ConfigError, match="unknown key 'tasks.dri'"):
        validate(compose_config(["tasks=llava_benchmarks", "+tasks.dri=/x", "stages=[check]"]))
    with pytest.raises(ConfigError, match=r"tasks.kind=nope must be one of mini_llava, llava_benchmarks"):
        validate(compose_config(["tasks.kind=nope"]))


def test_eval_stage_refuses_when_called_directly(tmp_path):
    cfg = compose_config(["tasks=llava_benchmarks", "tasks.dir=/x", "stages=[check]"])
    with pytest.raises(ConfigError, match="lmms-eval"):
        stage_eval(Run(cfg, tmp_path, tmp_path))
