"""Benchmark validation-set converters, on tiny fixtures written in each benchmark's own format."""
from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icons.data.benchmarks import EvaluatedSplitError, SourceError, convert, sample

SHORT = "\nAnswer the question using a single word or phrase."
MC_EN = "\nAnswer with the option's letter from the given choices directly."


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _human(rec) -> str:
    return rec["conversations"][0]["value"]


def _gpt(rec) -> str:
    return rec["conversations"][1]["value"]


def _ids(path: Path) -> list[str]:
    return [r["id"] for r in _load(path)]


# ---------------------------------------------------------------- sampling
def test_sample_is_seeded_and_independent_of_source_order():
    keys = [f"q{i}" for i in range(100)]
    a = sample(keys, 10, seed=0)
    assert a == sample(keys, 10, seed=0) and len(a) == 10
    assert a != sample(keys, 10, seed=1)
    shuffled = keys[:]
    random.Random(5).shuffle(shuffled)
    assert sorted(keys[i] for i in a) == sorted(shuffled[i] for i in sample(shuffled, 10, seed=0))
    assert len(sample(keys, 1000, seed=0)) == 100
    with pytest.raises(SourceError, match="duplicate"):
        sample(["a", "a"], 1, 0)


# ---------------------------------------------------------------- VQAv2
def _vqav2(tmp: Path, split: str, n: int = 30, shuffle: int | None = None):
    qs = [{"image_id": i, "question": f"What color is thing {i}?", "question_id": i * 10} for i in range(n)]
    anns = [{"question_id": i * 10, "image_id": i, "multiple_choice_answer": f"ans{i}",
             "answers": [{"answer": f"ans{i}", "answer_id": 1}]} for i in range(n) if i != 4]
    if shuffle is not None:
        random.Random(shuffle).shuffle(qs)
    q = _dump(tmp / f"v2_OpenEnded_mscoco_{split}_questions.json", {"data_subtype": split, "questions": qs})
    a = _dump(tmp / f"v2_mscoco_{split}_annotations.json", {"data_subtype": split, "annotations": anns})
    return [q, a]


def test_vqav2(tmp_path):
    path = convert("vqav2", _vqav2(tmp_path, "val2014"), tmp_path / "out", n=5, seed=0)
    recs = _load(path)
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    r = recs[0]
    i = int(r["id"].split("-")[1]) // 10
    assert r["image"] == f"coco/val2014/COCO_val2014_{i:012d}.jpg"
    assert _human(r) == f"<image>\nWhat color is thing {i}?" + SHORT
    assert _gpt(r) == r["answer"] == f"ans{i}" and r["task"] == "vqav2"
    assert "vqav2-40" not in _ids(path)  # no annotation, never sampled
    meta = _load(tmp_path / "out" / "vqav2.meta.json")
    assert (meta["split"], meta["n"], meta["seed"], meta["records"], meta["candidates"]) == ("val2014", 5, 0, 5, 29)
    # deterministic, independent of the source order, seed-dependent
    again = convert("vqav2", _vqav2(tmp_path / "shuffled", "val2014", shuffle=3), tmp_path / "out2", n=5, seed=0)
    assert _ids(again) == _ids(path)
    assert _ids(convert("vqav2", _vqav2(tmp_path, "val2014"), tmp_path / "out3", n=5, seed=1)) != _ids(path)


def test_vqav2_refuses_test_dev(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="test-dev2015"):
        convert("vqav2", _vqav2(tmp_path, "test-dev2015"), tmp_path / "out", n=5)
    assert not (tmp_path / "out" / "vqav2.json").exists()


# ---------------------------------------------------------------- GQA
def _gqa(tmp: Path, name: str) -> Path:
    data = {f"{i:05d}": {"imageId": f"n{i}", "question": f"Is the cup left of the plate {i}?", "answer": "yes" if i % 2
                         else "no", "fullAnswer": "..."} for i in range(20)}
    return _dump(tmp / name, data)


def test_gqa(tmp_path):
    recs = _load(convert("gqa", [_gqa(tmp_path, "val_balanced_questions.json")], tmp_path / "o", n=4, seed=2))
    assert len(recs) == 4
    r = recs[0]
    i = int(r["id"].split("-")[1])
    assert r["image"] == f"gqa/images/n{i}.jpg"
    assert _human(r) == f"<image>\nIs the cup left of the plate {i}?" + SHORT
    assert _gpt(r) == ("yes" if i % 2 else "no")


def test_gqa_refuses_testdev_and_unknown_names(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="testdev"):
        convert("gqa", [_gqa(tmp_path, "testdev_balanced_questions.json")], tmp_path / "o")
    with pytest.raises(SourceError, match="split"):
        convert("gqa", [_gqa(tmp_path, "questions.json")], tmp_path / "o")
    with pytest.raises(EvaluatedSplitError):  # an explicit split is checked too
        convert("gqa", [_gqa(tmp_path, "questions.json")], tmp_path / "o", split="testdev")


# ---------------------------------------------------------------- VizWiz
def _vizwiz(tmp: Path, split: str) -> Path:
    rows = []
    for i in range(12):
        answers = [{"answer": a, "answer_confidence": "yes"} for a in ["red"] * 3 + ["blue"] * 5 + ["green"] * 2]
        rows.append({"image": f"VizWiz_{split}_{i:08d}.jpg", "question": f"What colour is this {i}?",
                     "answers": answers, "answerable": 0 if i % 3 == 0 else 1, "answer_type": "other"})
    return _dump(tmp / f"{split}.json", rows)


def test_vizwiz(tmp_path):
    recs = _load(convert("vizwiz", [_vizwiz(tmp_path, "val")], tmp_path / "o", n=12, seed=0))
    assert len(recs) == 12
    by_id = {r["id"]: r for r in recs}
    r0, r1 = by_id["vizwiz-VizWiz_val_00000000"], by_id["vizwiz-VizWiz_val_00000001"]
    assert _gpt(r0) == "unanswerable" and _gpt(r1) == "blue"  # majority answer
    assert r1["image"] == "vizwiz/val/VizWiz_val_00000001.jpg"
    assert _human(r1) == ("<image>\nWhat colour is this 1?\nWhen the provided information is insufficient, "
                          "respond with 'Unanswerable'." + SHORT)


def test_vizwiz_refuses_test(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="'test'"):
        convert("vizwiz", [_vizwiz(tmp_path, "test")], tmp_path / "o")


# ---------------------------------------------------------------- ScienceQA-IMG
def _sqa(tmp: Path):
    probs = {}
    for i in range(10):
        probs[str(i)] = {"question": f"Which is hotter {i}?", "choices": ["sun", "ice", "snow"], "answer": i % 3,
                         "hint": "Think about it." if i % 2 else "", "image": "image.png" if i != 3 else None,
                         "split": "val"}
    splits = {"train": [], "val": [str(i) for i in range(8)], "test": ["8", "9"], "minitest": ["9"]}
    return [_dump(tmp / "problems.json", probs), _dump(tmp / "pid_splits.json", splits)]


def test_sqa(tmp_path):
    recs = _load(convert("sqa", _sqa(tmp_path), tmp_path / "o", n=50, seed=0))
    assert [r["id"] for r in recs] == [f"sqa-{i}" for i in (0, 1, 2, 4, 5, 6, 7)]  # val, with an image
    r1 = next(r for r in recs if r["id"] == "sqa-1")
    assert _human(r1) == ("<image>\nContext: Think about it.\nWhich is hotter 1?\nA. sun\nB. ice\nC. snow" + MC_EN)
    assert _gpt(r1) == "B" and r1["image"] == "scienceqa/images/val/1/image.png"
    assert _human(next(r for r in recs if r["id"] == "sqa-2")).startswith("<image>\nWhich is hotter 2?\nA. sun")


def test_sqa_refuses_test(tmp_path):
    for split in ("test", "minitest"):
        with pytest.raises(EvaluatedSplitError):
            convert("sqa", _sqa(tmp_path), tmp_path / "o", split=split)


# ---------------------------------------------------------------- TextVQA
def _textvqa(tmp: Path, split: str):
    data = [{"question": f"what number is on sign {i}?", "image_id": f"img{i}", "question_id": i,
             "answers": ["12"] * 6 + ["21"] * 4, "set_name": split} for i in range(8)]
    ocr = {"dataset_type": split, "data": [{"image_id": f"img{i}", "ocr_tokens": ["12", "stop"]} for i in range(8)]}
    return [_dump(tmp / f"TextVQA_0.5.1_{split}.json", {"dataset_type": split, "data": data}),
            _dump(tmp / f"TextVQA_Rosetta_OCR_v0.2_{split}.json", ocr)]


def test_textvqa(tmp_path):
    src = _textvqa(tmp_path, "train")
    r = _load(convert("textvqa", src, tmp_path / "o", n=3, seed=0))[0]
    i = int(r["id"].split("-")[1])
    assert _human(r) == f"<image>\nwhat number is on sign {i}?\nReference OCR token: 12, stop" + SHORT
    assert _gpt(r) == "12" and r["image"] == f"textvqa/train_images/img{i}.jpg"
    plain = _load(convert("textvqa", src[:1], tmp_path / "p", n=3, seed=0))[0]
    assert _human(plain) == f"<image>\nwhat number is on sign {i}?" + SHORT


def test_textvqa_refuses_val(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="'val'"):
        convert("textvqa", _textvqa(tmp_path, "val")[:1], tmp_path / "o")


# ---------------------------------------------------------------- POPE
def _coco(tmp: Path, split: str) -> Path:
    cats = [{"id": k, "name": name} for k, name in enumerate(["dog", "cat", "car", "tree", "bus"], start=1)]
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in range(1, 21)]
    anns = [{"image_id": i, "category_id": 1 + (i + j) % 5, "id": 100 * i + j} for i in range(1, 21) for j in range(2)]
    return _dump(tmp / f"instances_{split}.json", {"images": images, "annotations": anns, "categories": cats})


def test_pope_from_coco_instances(tmp_path):
    src = _coco(tmp_path, "train2014")
    recs = _load(convert("pope", [src], tmp_path / "o", n=10, seed=0))
    assert len(recs) == 10
    coco = _load(src)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    present = {}
    for a in coco["annotations"]:
        present.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    for yes, no in zip(recs[::2], recs[1::2]):
        assert (_gpt(yes), _gpt(no)) == ("yes", "no") and yes["image"] == no["image"]
        image_id = int(yes["id"].split("-")[1])
        assert yes["image"] == f"coco/train2014/COCO_train2014_{image_id:012d}.jpg"
        obj_yes = _human(yes).split("Is there a ")[1].split(" in the image?")[0]
        obj_no = _human(no).split("Is there a ")[1].split(" in the image?")[0]
        assert obj_yes in present[image_id] and obj_no not in present[image_id]
        assert _human(yes) == f"<image>\nIs there a {obj_yes} in the image?" + SHORT
    assert _ids(convert("pope", [src], tmp_path / "o2", n=10, seed=0)) == [r["id"] for r in recs]


def test_pope_question_files(tmp_path):
    rows = [{"question_id": i, "image": f"COCO_train2014_{i:012d}.jpg", "text": "Is there a dog in the image?",
             "label": "yes" if i % 2 else "no"} for i in range(1, 9)]
    recs = _load(convert("pope", [_jsonl(tmp_path / "pope_train.json", rows)], tmp_path / "o", n=4, seed=0))
    assert len(recs) == 4 and all(r["answer"] in ("yes", "no") for r in recs)
    assert recs[0]["image"].startswith("coco/train2014/COCO_train2014_")
    official = [dict(r, image=r["image"].replace("train2014", "val2014")) for r in rows]
    with pytest.raises(EvaluatedSplitError, match="val2014"):
        convert("pope", [_jsonl(tmp_path / "coco_pope_random.json", official)], tmp_path / "o")
    with pytest.raises(EvaluatedSplitError, match="val2014"):
        convert("pope", [_coco(tmp_path, "val2014")], tmp_path / "o")


# ---------------------------------------------------------------- MME
def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(path)


def _mme(tmp: Path) -> Path:
    root = tmp / "MME_Benchmark_release_version"
    for k in range(6):  # layout 1: images/ + questions_answers_YN/
        _png(root / "landmark" / "images" / f"{k:03d}.jpg", k)
        (root / "landmark" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (root / "landmark" / "questions_answers_YN" / f"{k:03d}.txt").write_text(
            f"Is this the Eiffel Tower {k}? Please answer yes or no.\tYes\n"
            f"Is this the Colosseum {k}? Please answer yes or no.\tNo\n", encoding="utf-8")
    for k in range(4):  # layout 2: images and .txt side by side
        _png(root / "count" / f"{k:04d}.png", k)
        (root / "count" / f"{k:04d}.txt").write_text(
            f"Are there {k} dogs? Please answer yes or no.\tYes\nAre there {k + 5} dogs? Please answer yes or no.\tNo\n",
            encoding="utf-8")
    return root


def test_mme_refused_without_holdout(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="holdout"):
        convert("mme", [_mme(tmp_path)], tmp_path / "o")


def test_mme_holdout_keeps_subtasks_and_pairs(tmp_path):
    root = _mme(tmp_path)
    recs = _load(convert("mme", [root], tmp_path / "o", n=8, seed=0, holdout=True))
    by_sub = {}
    for r in recs:
        by_sub.setdefault(r["subtask"], []).append(r)
    assert sorted(by_sub) == ["count", "landmark"] and all(len(v) == 4 for v in by_sub.values())  # 2 images each
    for rs in by_sub.values():  # both questions of each image, Yes then No
        assert [_gpt(r) for r in rs] == ["Yes", "No", "Yes", "No"]
        assert rs[0]["image"] == rs[1]["image"]
    lm = by_sub["landmark"][0]
    k = int(lm["image"].split("/")[-1].split(".")[0])
    assert lm["image"] == f"MME_Benchmark_release_version/landmark/images/{k:03d}.jpg"
    assert _human(lm) == f"<image>\nIs this the Eiffel Tower {k}?" + SHORT
    assert by_sub["count"][0]["image"].startswith("MME_Benchmark_release_version/count/")
    meta = _load(tmp_path / "o" / "mme.meta.json")
    assert meta["split"] == "holdout" and meta["heldout"] == [r["id"] for r in recs]
    assert meta["subtasks"] == {"count": 4, "landmark": 4}
    assert _ids(convert("mme", [root], tmp_path / "o2", n=8, seed=0, holdout=True)) == [r["id"] for r in recs]


# ---------------------------------------------------------------- MMBench
def _b64_png(value: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), value, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench(tmp: Path, name: str, answers: bool = True) -> Path:
    cols = ["index", "question", "hint", "A", "B", "C", "D"] + (["answer"] if answers else []) + [
        "category", "image", "source", "l2-category", "comment", "split"]
    lines = ["\t".join(cols)]
    for i in range(6):
        row = {"index": str(1000 + i), "question": f"What is shown {i}?", "hint": "A photo." if i % 2 else "nan",
               "A": "a cat", "B": "a dog", "C": "a car" if i % 3 else "nan", "D": "nan", "answer": "B",
               "category": "object_localization", "image": _b64_png(10 * i), "source": "x", "l2-category": "y",
               "comment": "nan", "split": "dev"}
        lines.append("\t".join(row[c] for c in cols))
    path = tmp / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_mmbench_holdout(tmp_path):
    src = _mmbench(tmp_path, "mmbench_dev_20230712.tsv")
    with pytest.raises(EvaluatedSplitError, match="dev"):
        convert("mmbench_en", [src], tmp_path / "o")
    out = tmp_path / "o"
    recs = _load(convert("mmbench_en", [src], out, n=4, seed=0, holdout=True))
    assert len(recs) == 4
    by_id = {r["id"]: r for r in recs}
    for r in recs:
        i = int(r["id"].split("-")[1]) - 1000
        with Image.open(out / r["image"]) as im:  # decoded and written under --out
            assert im.size == (7, 5) and im.getpixel((0, 0)) == (10 * i, 10 * i, 10 * i)
        assert r["image"] == f"mmbench_en_images/{1000 + i}.png" and _gpt(r) == "B"
        hint = "A photo.\n" if i % 2 else ""
        opts = "A. a cat\nB. a dog" + ("\nC. a car" if i % 3 else "")
        assert _human(r) == f"<image>\n{hint}What is shown {i}?\n{opts}" + MC_EN
    assert _load(out / "mmbench_en.meta.json")["heldout"] == list(by_id)
    cn = _load(convert("mmbench_cn", [src], tmp_path / "cn", n=1, seed=0, holdout=True,
                       image_prefix="icons_val/mmbench_cn_images"))[0]
    assert cn["image"].startswith("icons_val/mmbench_cn_images/")  # named under the image root ...
    assert (tmp_path / "cn" / "mmbench_cn_images" / cn["image"].split("/")[-1]).is_file()  # ... written under --out
    assert _human(cn).endswith("\n请直接回答选项字母。")


def test_mmbench_test_split_has_no_answers(tmp_path):
    with pytest.raises(SourceError, match="no answers"):
        convert("mmbench_en", [_mmbench(tmp_path, "mmbench_test_en.tsv", answers=False)], tmp_path / "o",
                holdout=True)


# ---------------------------------------------------------------- LLaVA-Bench
def _llavaw(tmp: Path, coco: bool):
    qname, aname = ("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl") if coco else ("questions.jsonl",
                                                                                    "answers_gpt4.jsonl")
    # qa90_questions.jsonl as released: bare COCO numbers ({"question_id": 0, "image": "000000441147.jpg", ...})
    image = (lambda i: f"{441147 + i:012d}.jpg") if coco else (lambda i: f"{i:03d}.jpg")
    qs = [{"question_id": i, "image": image(i), "text": f"Describe picture {i}.", "category": "detail"}
          for i in range(10)]
    ans = [{"question_id": i, "text": f"It shows thing {i}.", "model_id": "gpt-4-0314"} for i in range(10)]
    return [_jsonl(tmp / qname, qs), _jsonl(tmp / aname, ans)]


def test_llavaw(tmp_path):
    with pytest.raises(EvaluatedSplitError, match="in-the-wild"):
        convert("llavaw", _llavaw(tmp_path / "w", coco=False), tmp_path / "o")
    held = _load(convert("llavaw", _llavaw(tmp_path / "w", coco=False), tmp_path / "o", n=50, holdout=True))
    assert len(held) == 5  # at most half of the evaluated set
    coco = _load(convert("llavaw", _llavaw(tmp_path / "c", coco=True), tmp_path / "c_out", n=50))
    assert len(coco) == 10
    r = coco[3]
    assert _human(r) == "<image>\nDescribe picture 3." and _gpt(r) == "It shows thing 3."
    assert r["image"] == "coco/val2014/COCO_val2014_000000441150.jpg" and r["category"] == "detail"


def test_llavaw_coco_images_resolve_to_files_that_exist(tmp_path):
    """COCO val2014's files carry the COCO_val2014_ prefix that qa90's bare numbers lack; COCO 2017
    folders use the bare numbers. Given the image root, each record points at the file that exists."""
    src = _llavaw(tmp_path / "c", coco=True)
    root = tmp_path / "playground"
    (root / "coco" / "val2014").mkdir(parents=True)
    for i in range(10):
        name = f"{441147 + i:012d}.jpg"
        (root / "coco" / "val2014" / (f"COCO_val2014_{name}" if i % 2 else name)).write_bytes(b"jpg")
    recs = _load(convert("llavaw", src, tmp_path / "o", n=50, image_root=root))
    assert all((root / r["image"]).is_file() for r in recs)
    assert {r["image"].split("/")[-1][:5] for r in recs} == {"COCO_", "00000"}
    (root / "coco" / "val2014" / "COCO_val2014_000000441148.jpg").unlink()
    with pytest.raises(SourceError, match="--image-prefix"):
        convert("llavaw", src, tmp_path / "o2", n=50, image_root=root)


# ---------------------------------------------------------------- the records load like any LLaVA data
def test_records_are_valid_llava_records(tmp_path):
    from icons.data.llava_json import validate_records

    recs = _load(convert("mme", [_mme(tmp_path)], tmp_path / "o", n=8, seed=0, holdout=True))
    res = validate_records(recs, file="mme.json", image_root=tmp_path)
    assert res.problems == [] and len(res.records) == len(recs)


# ---------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icons.data.benchmarks", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path):
    src = _gqa(tmp_path, "val_balanced_questions.json")
    p = _cli("gqa", "--src", str(src), "--out", str(tmp_path / "o"), "--n", "3", "--seed", "0")
    assert p.returncode == 0, p.stderr
    assert len(_load(tmp_path / "o" / "gqa.json")) == 3
    assert _ids(tmp_path / "o" / "gqa.json") == _ids(convert("gqa", [src], tmp_path / "api", n=3, seed=0))
    bad = _cli("gqa", "--src", str(_gqa(tmp_path, "testdev_balanced_questions.json")), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: gqa: 'testdev'") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x" / "gqa.json").exists()
    wrong = _cli("vqav2", "--src", str(src), "--out", str(tmp_path / "y"))
    assert wrong.returncode == 2 and "takes" in wrong.stderr
