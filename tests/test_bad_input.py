"""Bad input, one case per test: the reader/validator of LLaVA-format files (icons.data.llava_json)
and the check over pool + task files (icons.data.check). Tiny synthetic files in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icons.data.check import check_inputs
from icons.data.sources import DataSources, data_sources, task_name_problems
from icons.config import ConfigError, validate
from icons.data.encode import IGNORE, Encoder
from icons.data.llava_json import (
    BadInputError,
    PoolFileError,
    format_problem,
    read_pool,
    scan_file,
    validate_records,
)

from .conftest import compose_config

ASSET = Path(__file__).resolve().parents[1] / "src" / "icons" / "assets" / "tiny_llava_base"


# ------------------------------------------------------------------ helpers
def png(path: Path, mode: str = "RGB", fmt: str = "PNG") -> Path:
    """A 32x32 image file in ``mode`` (a few coloured blocks, so conversions have content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (32, 32), (200, 30, 30))
    rgb.paste((20, 180, 40), (0, 0, 16, 16))
    rgb.paste((30, 30, 220), (16, 16, 32, 32))
    im = {"RGB": rgb, "RGBA": rgb.convert("RGBA"), "L": rgb.convert("L"), "P": rgb.convert("P"),
          "CMYK": rgb.convert("CMYK")}[mode]
    im.save(path, format=fmt)
    return path


def rec(rid, image: str | None = "a.png", q: str = "What colour is the square ?", a: str = "red",
        token: bool = True) -> dict:
    r = {"id": rid}
    if image is not None:
        r["image"] = image
    r["conversations"] = [{"from": "human", "value": (f"<image>\n{q}" if image and token else q)},
                          {"from": "gpt", "value": a}]
    return r


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def only(problems: list[dict]) -> dict:
    assert len(problems) == 1, problems
    return problems[0]


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def root(tmp_path: Path) -> Path:
    png(tmp_path / "a.png")
    return tmp_path


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoTokenizer

    return Encoder(AutoTokenizer.from_pretrained(ASSET), 16, 32, 160)


# ------------------------------------------------------------------ files
def test_invalid_json_file(root):
    path = root / "pool.json"
    path.write_text('[\n {"id": "r0", "conversations": []},\n {"id": "r1" "conversations": []}\n]\n')
    for policy in ("error", "skip"):  # a broken .json file cannot be skipped around
        with pytest.raises(PoolFileError) as info:
            read_pool(path, on_bad_record=policy)
        msg = one_line(info.value)
        assert str(path) in msg and "line 3" in msg and "invalid JSON" in msg
        assert info.value.problems[0]["kind"] == "invalid_json_file"


def test_invalid_jsonl_line_names_the_line(root):
    path = root / "pool.jsonl"
    lines = [json.dumps(rec("r0")), "", json.dumps(rec("r1")), '{"id": "r2", "conversations": [', json.dumps(rec("r3"))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError) as info:
        read_pool(path)
    msg = one_line(info.value)
    assert f"{path} line 4 record 2:" in msg and "invalid JSON" in msg and "[invalid_json]" in msg
    res = read_pool(path, on_bad_record="skip")
    assert [r["id"] for r in res.records] == ["r0", "r1", "r3"]
    p = only(res.problems)
    assert (p["line"], p["position"], p["kind"]) == (4, 2, "invalid_json")


def test_non_utf8_bytes_in_json_file(root):
    path = root / "pool.json"
    good = json.dumps([rec("r0")]).encode()
    path.write_bytes(b'[\n{"id": "caf\xe9", "conversations": []},\n' + good[1:])
    with pytest.raises(PoolFileError) as info:
        read_pool(path, on_bad_record="skip")
    msg = one_line(info.value)
    assert "line 2" in msg and "0xe9" in msg and "UTF-8" in msg


def test_non_utf8_bytes_in_jsonl_line(root):
    path = root / "pool.jsonl"
    path.write_bytes(json.dumps(rec("r0")).encode() + b"\n" + b'{"id": "caf\xe9"}\n' + json.dumps(rec("r2")).encode())
    with pytest.raises(BadInputError, match=r"line 2 record 1: .*0xe9.*not valid UTF-8"):
        read_pool(path)
    res = read_pool(path, on_bad_record="skip")
    assert [r["id"] for r in res.records] == ["r0", "r2"]
    assert only(res.problems)["kind"] == "not_utf8"


@pytest.mark.parametrize("suffix,content", [(".json", "[]"), (".jsonl", "\n\n")])
def test_empty_pool(root, suffix, content):
    path = root / f"pool{suffix}"
    path.write_text(content)
    for policy in ("error", "skip"):
        with pytest.raises(PoolFileError, match="contains no records") as info:
            read_pool(path, on_bad_record=policy)
        assert info.value.problems[0]["kind"] == "empty_file"


def test_pool_of_only_bad_records_is_empty_even_when_skipping(root):
    path = write_json(root / "pool.json", [{"id": "r0"}, {"id": "r1", "conversations": []}])
    with pytest.raises(PoolFileError, match="none of its 2 records is usable"):
        read_pool(path, on_bad_record="skip")


def test_missing_pool_file_and_wrong_suffix(root):
    with pytest.raises(PoolFileError, match="does not exist"):
        read_pool(root / "nope.json")
    with pytest.raises(PoolFileError, match="expected a .json"):
        read_pool(png(root / "pool.png"))


# ------------------------------------------------------------------ records: conversations
def test_record_without_conversations(root):
    res = validate_records([rec("r0"), {"id": "r1", "image": "a.png"}], file="pool.json", image_root=root)
    p = only(res.problems)
    assert (p["position"], p["id"], p["field"], p["kind"]) == (1, "r1", "conversations", "missing_conversations")
    assert [r["id"] for r in res.records] == ["r0"]


def test_empty_conversations_list(root):
    res = validate_records([{"id": "r0", "image": "a.png", "conversations": []}], image_root=root)
    p = only(res.problems)
    assert (p["field"], p["kind"]) == ("conversations", "empty_conversations")
    assert not res.records


def test_roles_out_of_order(root):
    r = rec("r0")
    r["conversations"] = [r["conversations"][1], r["conversations"][0]]  # gpt first
    two_humans = rec("r1")
    two_humans["conversations"] = [two_humans["conversations"][0], {"from": "human", "value": "and ?"},
                                   {"from": "gpt", "value": "red"}]
    no_answer = rec("r2")
    no_answer["conversations"] = no_answer["conversations"][:1]
    res = validate_records([r, two_humans, no_answer, rec("r3")], image_root=root)
    assert [(p["id"], p["field"], p["kind"]) for p in res.problems] == [
        ("r0", "conversations[0].from", "role_order"),
        ("r1", "conversations[1].from", "role_order"),
        ("r2", "conversations[0].from", "role_order")]
    assert "expected 'human', got 'gpt'" in res.problems[0]["message"]
    assert "no gpt answer" in res.problems[2]["message"]
    assert [r["id"] for r in res.records] == ["r3"]


def test_unknown_role(root):
    r = rec("r0")
    r["conversations"][1]["from"] = "assistant"
    res = validate_records([r], image_root=root)
    p = only(res.problems)
    assert (p["field"], p["kind"]) == ("conversations[1].from", "unknown_role")
    assert "'assistant'" in p["message"]


# ------------------------------------------------------------------ records: images
def test_image_file_missing(root):
    res = validate_records([rec("r0", image="missing/b.png")], file="pool.json", image_root=root)
    p = only(res.problems)
    assert (p["field"], p["kind"]) == ("image", "missing_image")
    assert str(root / "missing" / "b.png") in p["message"]


def test_truncated_image_file(root):
    data = (root / "a.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    res = validate_records([rec("r0", image="cut.png")], image_root=root)
    assert only(res.problems)["kind"] == "truncated_image"


def test_file_that_is_not_an_image(root):
    (root / "notes.png").write_text("these are my notes, not pixels\n" * 10)
    (root / "empty.png").write_bytes(b"")
    res = validate_records([rec("r0", image="notes.png"), rec("r1", image="empty.png")], image_root=root)
    assert [(p["id"], p["kind"]) for p in res.problems] == [("r0", "not_an_image"), ("r1", "not_an_image")]


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")])
def test_odd_image_modes_are_converted_to_rgb(root, encoder, mode, fmt):
    name = f"odd_{mode}.{fmt.lower()}"
    png(root / name, mode, fmt)
    with Image.open(root / name) as im:
        assert im.mode == mode
    res = validate_records([rec("r0", image=name)], image_root=root, encoder=encoder)
    assert not res.problems and len(res.records) == 1
    assert res.stats["image_modes"] == {mode: 1}
    pixels = Encoder(encoder.tok, 16, 32, 160, root).load_image(res.records[0])
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 0  # the blocks survived the conversion


def test_image_field_that_is_not_a_path(root):
    r = rec("r0")
    r["image"] = ["a.png", "a.png"]
    res = validate_records([r], image_root=root)
    assert only(res.problems)["kind"] == "bad_image_field"


# ------------------------------------------------------------------ records: <image> tokens
def test_image_token_without_image_field(root):
    r = rec("r0", image=None)
    r["conversations"][0]["value"] = "<image>\nWhat is this ?"
    res = validate_records([r, rec("r1", image=None)], image_root=root)
    p = only(res.problems)
    assert (p["id"], p["field"], p["kind"]) == ("r0", "image", "image_token_without_image")
    assert [r["id"] for r in res.records] == ["r1"]
    assert res.stats["text_only"] == 2 and res.stats["with_image"] == 0


def test_image_without_image_token_gets_one_and_is_counted(root, encoder):
    original = rec("r0", token=False)
    res = validate_records([original, rec("r1")], image_root=root, encoder=encoder)
    assert not res.problems
    fixed = res.records[0]
    assert fixed["conversations"][0]["value"] == "<image>\nWhat colour is the square ?"
    assert original["conversations"][0]["value"] == "What colour is the square ?"  # input left alone
    assert fixed["id"] == "r0" and fixed["image"] == "a.png"
    assert res.stats["fixes"] == {"image_token_inserted": 1}
    e = encoder.encode(fixed, pixels=np.zeros((32, 32, 3), np.uint8))
    assert e.input_ids.count(encoder.image_id) == 16 and e.pixels is not None


def test_two_image_tokens_or_one_in_an_answer(root):
    twice = rec("r0", q="<image> and again <image>")
    answer = rec("r1", a="it is <image>")
    res = validate_records([twice, answer], image_root=root)
    assert [(p["id"], p["kind"]) for p in res.problems] == [("r0", "image_token_count"),
                                                            ("r1", "image_token_in_answer")]


# ------------------------------------------------------------------ records: ids
def test_repeated_ids_are_labels_listed_and_kept(root):
    """LLaVA-665K's COCO-derived records carry their image's id, so ids repeat: every record is kept
    and each repeat is listed with both positions; data.repeated_ids=error refuses them instead."""
    path = write_jsonl(root / "pool.jsonl", [rec("r0"), rec("r1"), rec("r0"), rec(7), rec("7"), rec(7)])
    res = read_pool(path)
    assert [r["id"] for r in res.records] == ["r0", "r1", "r0", 7, "7", 7] and res.positions == list(range(6))
    assert not res.problems and res.stats["repeated_ids"] == 2
    assert [(r["position"], r["line"], r["id"], r["first_position"]) for r in res.repeated] == [
        (2, 3, "r0", 0), (5, 6, 7, 3)]
    with pytest.raises(BadInputError) as info:
        read_pool(path, repeated_ids="error")
    msg = one_line(info.value)
    assert "line 3 record 2 id 'r0'" in msg and "already used by record 0" in msg and "(+1 more problem)" in msg
    res = read_pool(path, on_bad_record="skip", repeated_ids="error")
    assert [r["id"] for r in res.records] == ["r0", "r1", 7, "7"]  # ids exactly as given; first one wins
    assert [(p["position"], p["id"], p["kind"]) for p in res.problems] == [(2, "r0", "duplicate_id"),
                                                                          (5, 7, "duplicate_id")]


def test_missing_or_bad_id(root):
    no_id = rec("x")
    del no_id["id"]
    res = validate_records([no_id, rec(""), rec(None), rec(True), rec("ok")], image_root=root)
    assert [(p["position"], p["kind"]) for p in res.problems] == [(0, "missing_id"), (1, "bad_id"), (2, "bad_id"),
                                                                 (3, "bad_id")]
    assert [r["id"] for r in res.records] == ["ok"]


# ------------------------------------------------------------------ length
def test_longer_than_max_length_truncates_answer_but_never_drops_the_image(root, encoder):
    long_answer = rec("long_answer", a=" ".join(["red"] * 400))
    image_late = rec("image_late", token=False, q=" ".join(["square"] * 200) + " <image>")
    long_prompt = rec("long_prompt", q=" ".join(["square"] * 400))
    long_text = rec("long_text", image=None, q=" ".join(["square"] * 400))
    res = validate_records([long_answer, image_late, long_prompt, long_text, rec("short")], file="pool.json",
                           image_root=root, encoder=encoder)
    assert [(p["id"], p["kind"]) for p in res.problems] == [
        ("image_late", "too_long"), ("long_prompt", "too_long"), ("long_text", "too_long")]
    assert "image tokens would be cut" in res.problems[0]["message"]
    assert "no answer token fits in model.max_length=160" in res.problems[1]["message"]
    assert all("max_length=160" in p["message"] for p in res.problems)
    assert [r["id"] for r in res.records] == ["long_answer", "short"]
    assert res.stats["truncated"] == 1
    t = only(res.truncated)
    assert (t["id"], t["position"], t["max_length"]) == ("long_answer", 0, 160) and t["tokens"] > 400
    e = encoder.encode(res.records[0], pixels=np.zeros((32, 32, 3), np.uint8))
    assert e.truncated and len(e.input_ids) == 160
    assert e.input_ids.count(encoder.image_id) == 16 and e.pixels is not None  # the image is still there
    assert any(lab != IGNORE for lab in e.labels)


# ------------------------------------------------------------------ skip keeps everything else
def test_skip_keeps_ids_and_reports_positions_of_skipped(root):
    records = [rec("a"), {"id": "b"}, rec("c", image="gone.png"), rec("d", token=False), rec("e"),
               {"id": "f", "conversations": []}, rec("a"), rec("g", image=None)]
    path = write_jsonl(root / "pool.jsonl", records)
    res = read_pool(path, on_bad_record="skip")
    assert [r["id"] for r in res.records] == ["a", "d", "e", "a", "g"]  # the repeated id 'a' is kept
    assert res.positions == [0, 3, 4, 6, 7]
    assert res.bad_positions == [1, 2, 5]
    assert [(p["position"], p["line"], p["id"], p["kind"]) for p in res.problems] == [
        (1, 2, "b", "missing_conversations"), (2, 3, "c", "missing_image"), (5, 6, "f", "empty_conversations")]
    assert [(r["position"], r["first_position"]) for r in res.repeated] == [(6, 0)]
    for p in res.problems:
        assert set(p) == {"file", "position", "line", "id", "field", "kind", "message"}
        assert p["file"] == str(path)
    # nothing else lost: every good record is the input record (d only gained its <image> token)
    by_id = {r["id"]: r for r in records[:6]}
    for r in res.records:
        if r["id"] != "d":
            assert r == (by_id[r["id"]] if r["id"] != "g" else records[7])
    assert res.stats["records"] == 8 and res.stats["ok"] + res.stats["bad"] == 8
    assert res.stats["fixes"] == {"image_token_inserted": 1}


def test_error_names_file_position_id_field_and_problem(root):
    path = write_json(root / "pool.json", [rec("r0"), rec("r1", image="lost.png")])
    with pytest.raises(BadInputError) as info:
        read_pool(path)
    msg = one_line(info.value)
    assert msg.startswith(f"bad input: {path} record 1 id 'r1': field 'image': image file ")
    assert msg.endswith("does not exist [missing_image]")
    assert format_problem(info.value.problems[0]) in msg


# ------------------------------------------------------------------ tasks
def _sources(tmp_path: Path, pool: Path, val: dict[str, Path], test: dict[str, Path]) -> DataSources:
    return DataSources("llava_json", pool, tmp_path, tmp_path, val, test)


def test_empty_validation_set(root, encoder):
    pool = write_json(root / "pool.json", [rec("r0")])
    val = {"vqav2": write_json(root / "vqav2_val.json", []), "gqa": write_json(root / "gqa_val.json", [rec("g0")])}
    test = {t: write_json(root / f"{t}_test.json", [rec(f"{t}0")]) for t in val}
    cfg = compose_config(["data=llava_json", f"data.path={pool}", "tasks.names=[vqav2,gqa]",
                          "data.on_bad_record=skip"])
    report = check_inputs(cfg, _sources(root, pool, val, test), encoder)
    p = only(report["fatal"])  # fatal: skipping cannot make an empty validation set usable
    assert (p["file"], p["kind"]) == (str(val["vqav2"]), "empty_file")
    assert "vqav2 val set is empty" in p["message"]
    assert p in report["problems"]


def test_bad_record_in_a_task_file_is_found(root, encoder):
    pool = write_json(root / "pool.json", [rec("r0")])
    val = {"vqav2": write_json(root / "val.json", [rec("v0"), rec("v1", image="nope.png")])}
    test = {"vqav2": write_json(root / "test.json", [rec("t0", a=" ".join(["red"] * 400))])}
    cfg = compose_config(["data=llava_json", f"data.path={pool}", "tasks.names=[vqav2]"])
    report = check_inputs(cfg, _sources(root, pool, val, test), encoder)
    p = only(report["problems"])
    assert (p["file"], p["position"], p["id"], p["kind"]) == (str(val["vqav2"]), 1, "v1", "missing_image")
    assert not report["fatal"] and not report["truncated"]  # test prompts are checked without the answer


def test_task_names_that_collide(root):
    with pytest.raises(ConfigError, match=r"tasks.names=\[vqav2, vqav2\] lists 'vqav2' twice"):
        validate(compose_config(["tasks.names=[vqav2,vqav2]"]))
    probs = task_name_problems(["vqav2", "gqa", "VQAv2", "a/b"], known=("vqav2", "gqa"))
    assert [(p["field"], p["kind"]) for p in probs] == [("tasks.names[2]", "task_name_collision"),
                                                        ("tasks.names[3]", "task_name_collision")]
    assert "collides with 'vqav2'" in probs[0]["message"]
    assert [p["kind"] for p in task_name_problems(["vqav2", "nope"], known=("vqav2",))] == ["unknown_task"]
    cfg = compose_config(["tasks.names=[vqav2,VQAV2]", f"cache_dir={root / 'cache'}"])
    with pytest.raises(BadInputError, match=r"^bad input: config: field 'tasks.names\[1\]': task name 'VQAV2' "
                                            r"collides with 'vqav2'"):
        data_sources(cfg)  # before anything is generated
    assert not (root / "cache").exists()


def test_scan_file_reports_everything_without_policy(root):
    path = write_jsonl(root / "pool.jsonl", [rec("r0"), {"id": "r1"}, rec("r2", image="x.png")])
    res = scan_file(path, root)
    assert res.stats["records"] == 3 and res.stats["ok"] == 1
    assert res.stats["problems"] == {"missing_conversations": 1, "missing_image": 1}
