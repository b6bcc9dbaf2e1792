"""The real pools' files, in their released shapes (LLaVA-1.5's README and data card, Cambrian's and
Vision-Flan's loaders), through the check, data, select and subset stages: ids are labels (rows are
positions), records load unchanged, subset.json holds the selected source records exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icons.io import read_json
from icons.pipeline import Run, run_stages
from icons.stages import load_pool

from .conftest import compose_config

SMALL = ["data.pool_size=240", "tasks=mini_llava_smoke", "tasks.n_val=4", "tasks.n_test=6", "logger=none"]


def _turns(*pairs):
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


# llava_v1_5_mix665k.json's kinds of record: COCO-derived records carry the image id, so the LLaVA-Instruct
# conversation and the VQAv2 question on one image share it; GQA's ids are integers; ShareGPT's have no image
# (no 'image' key); a region question with <image> after its text; multi-turn OCR-VQA.
LLAVA_665K = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": _turns(
        ("<image>\nWhat are the colors of the bus in the image?", "The bus in the image is white and red."),
        ("What feature can be seen on the back of the bus?", "The back of the bus features an advertisement."))},
    {"id": "i6IyJda_0", "conversations": _turns(("Summarize the plot of Hamlet in two sentences.",
                                                 "A prince avenges his father. Almost everyone dies."))},
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": _turns(
        ("<image>\nWhat is the color of the bus?\nAnswer the question using a single word or phrase.", "White"))},
    {"id": 2327515, "image": "gqa/images/2327515.jpg", "conversations": _turns(
        ("<image>\nIs the sky dark?\nAnswer the question using a single word or phrase.", "No"))},
    {"id": "140031996X", "image": "ocr_vqa/images/140031996X.jpg", "conversations": _turns(
        ("<image>\nWho is the author of this book?\nAnswer the question using a single word or phrase.",
         "H. Jackson Brown"), ("What is the title of this book?", "Life's Little Instruction Book"),
        ("Is this a religious book?", "No"))},
    {"id": "VG_100K_2/1", "image": "vg/VG_100K_2/1.jpg", "conversations": _turns(
        ("Please provide the bounding box coordinate of the region this sentence describes: a man.\n<image>",
         "[0.12, 0.3, 0.45, 0.9]"))},
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": _turns(
        ("<image>\nHow many buses are there?\nAnswer the question using a single word or phrase.", "1"))},
    # an image record whose question lacks <image>: LLaVA's loader puts it first; the file keeps it as it is
    {"id": "000000000139", "image": "coco/train2017/000000000139.jpg", "conversations": _turns(
        ("Describe the image concisely.", "A living room with a television."))},
]


def _image(path: Path, colour=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), colour).save(path)


def _playground(root: Path, records: list[dict], name: str) -> Path:
    for r in records:
        if r.get("image") and str(r["image"]) not in ("", "None", "none", "nan"):
            _image(root / r["image"])
    path = root / name
    path.write_text(json.dumps(records, ensure_ascii=False))  # one line, as json.dump writes it
    return path


def _cfg(*extra):
    return compose_config([*SMALL, *extra])


def test_llava_665k_records_pass_the_check_and_round_trip_by_position(tmp_path, icons_cache):
    root = tmp_path / "playground" / "data"
    path = _playground(root, LLAVA_665K, "llava_v1_5_mix665k.json")
    cfg = _cfg("data=llava_665k", f"data.path={path}", f"data.image_root={root}", "selectors=[random]",
               "selection.ratio=0.5", "stages=[check,data,select,subset]")
    out = run_stages(cfg, tmp_path / "run")
    check = out["check"]
    assert check["records"] == check["ok"] == 8 and check["problems"] == 0 and check["text_only"] == 1
    assert check["repeated_ids"] == 2  # the bus image's id, twice more: listed, not a problem
    repeated = [json.loads(line) for line in (tmp_path / "run" / "check" / "repeated_ids.jsonl").open()]
    assert [(r["position"], r["id"], r["first_position"]) for r in repeated] == [
        (2, "000000033471", 0), (6, "000000033471", 0)]
    pool = load_pool(Run(cfg, tmp_path / "run", tmp_path / "run"))
    assert pool.ids == [r["id"] for r in LLAVA_665K]  # kept as given: repeats, an integer
    sel = tmp_path / "run" / "selection" / "random"
    positions = np.load(sel / "positions.npy").tolist()
    assert len(positions) == 4 and read_json(sel / "ids.json") == [LLAVA_665K[p]["id"] for p in positions]
    # subset.json: the selected source records exactly as they are in the file, keys in the same order
    subset_text = (sel / "subset" / "subset.json").read_text()
    assert [json.dumps(r, ensure_ascii=False) for r in json.loads(subset_text)] == [
        json.dumps(LLAVA_665K[p], ensure_ascii=False) for p in positions]
    # every row reads back as the file has it; the stages see LLaVA's <image> repair
    assert [pool.raw(k) for k in range(len(pool))] == LLAVA_665K
    assert pool[7]["conversations"][0]["value"] == "<image>\nDescribe the image concisely."
    from icons.subset import subset_rows

    assert list(subset_rows(pool, [7, 5], [LLAVA_665K[7]["id"], LLAVA_665K[5]["id"]])) == [LLAVA_665K[7], LLAVA_665K[5]]


def test_repeated_ids_train_the_rows_selected_and_transfer_by_position(tmp_path, icons_cache):
    """Two rows with one id are two records: the 13B transfer (selection.from_run) takes the same
    positions, and the training key tells two selections of the same ids apart."""
    from icons.stages.train import rows_key

    root = tmp_path / "playground" / "data"
    path = _playground(root, LLAVA_665K, "llava_v1_5_mix665k.json")
    base = ["data=llava_665k", f"data.path={path}", f"data.image_root={root}", "selectors=[random]",
            "selection.ratio=0.5"]
    run_stages(_cfg(*base, "stages=[check,data,select]"), tmp_path / "a")
    cfg_b = _cfg(*base, "stages=[data,select]", f"selection.from_run={tmp_path / 'a'}")
    run_stages(cfg_b, tmp_path / "b")
    for f in ("positions.npy", "indices.npy"):
        assert np.load(tmp_path / "b" / "selection" / "random" / f).tolist() == \
            np.load(tmp_path / "a" / "selection" / "random" / f).tolist()
    pool = load_pool(Run(cfg_b, tmp_path / "b", tmp_path / "b"))
    assert [pool.ids[k] for k in (0, 2)] == [pool.ids[0]] * 2
    assert rows_key(pool, [0]) != rows_key(pool, [2])  # same id list, other records


@pytest.mark.parametrize("value", ["", "None", "none", "nan"])
def test_cambrian_text_only_image_values(tmp_path, icons_cache, value):
    """Cambrian-7M writes "", "None", "none" or "nan" as the image of a text-only record; its loader
    reads them as no image (train_fsdp.py: str(sample['image']) in ['', 'None', 'none', 'nan'])."""
    from icons.data.encode import has_image

    recs = [{"id": "t0", "image": value, "conversations": _turns(("What is 2 + 3?", "5"))},
            {"id": "i0", "image": "coco/train2017/000000000009.jpg",
             "conversations": _turns(("<image>\nWhat is on the plate?", "Broccoli."))}]
    root = tmp_path / "Cambrian-10M"
    _image(root / recs[1]["image"])
    path = root / "jsons" / "Cambrian7M_withsystemprompt.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = run_stages(_cfg("data=cambrian_7m", f"data.path={path}", f"data.image_root={root}", "stages=[check]"),
                     tmp_path / "run")
    assert out["check"]["problems"] == 0 and out["check"]["text_only"] == 1 and out["check"]["with_image"] == 1
    assert not has_image(recs[0]) and has_image({"image": "x.jpg"}) and not has_image({"image": float("nan")})


def test_vision_flan_preset_finds_the_released_image_folder(tmp_path, icons_cache, monkeypatch):
    """Vision-Flan-186K unpacks its images flat into images_191task_1k/; the records' image values
    are bare file names there (<task>_<n>_<original name>), as projects training on it pass
    --image_folder .../images_191task_1k."""
    base = tmp_path / "playground" / "data" / "vision-flan_191-task_1k"
    names = ["VQA_counting_COCO_train2014_000000076081.jpg", "PACS+guitar_image_category_classification_830_n0327.png"]
    recs = [{"id": f"vf-{k}", "image": n, "task_name": n.split("_")[0], "conversations": _turns(
        ("<image>\nHow many objects are in the image?", "3"))} for k, n in enumerate(names)]
    for n in names:
        _image(base / "images_191task_1k" / n)
    (base / "annotation_191-task_1k.json").write_text(json.dumps(recs, indent=1))
    monkeypatch.chdir(tmp_path)  # the preset's paths are LLaVA's playground layout, relative to the working dir
    out = run_stages(_cfg("data=vision_flan", "stages=[check]"), tmp_path / "run")
    assert out["check"]["records"] == out["check"]["ok"] == 2 and out["check"]["problems"] == 0
