"""The miniature LLaVA benchmark: determinism, no leakage, real files in LLaVA format."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icons.data.mini_llava import TASK_NAMES, BenchmarkSpec, build
from icons.data.mini_llava.families import FAMILY_SHARES

SMOKE = BenchmarkSpec(pool_size=400, n_val=8, n_test=20)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build(SMOKE, tmp_path_factory.mktemp("bench"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(bench, tmp_path):
    again = build(SMOKE, tmp_path)
    assert _tree_digest(again.root) == _tree_digest(bench.root)


def test_different_seed_differs(bench, tmp_path):
    other = build(BenchmarkSpec(pool_size=400, n_val=8, n_test=20, seed=1), tmp_path)
    assert (other.root / "pool.json").read_bytes() != (bench.root / "pool.json").read_bytes()


def test_llava_format(bench):
    pool = json.loads(bench.pool_path.read_text())
    assert len(pool) == SMOKE.pool_size
    assert len({r["id"] for r in pool}) == len(pool)
    text_only = 0
    for r in pool:
        assert set(r) <= {"id", "image", "conversations"}, "metadata must stay out of the pool file"
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n")
            with Image.open(bench.image_root / r["image"]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
        else:
            text_only += 1
            assert all("<image>" not in t["value"] for t in conv)
    assert text_only > 0


def test_side_metadata(bench):
    meta = [json.loads(line) for line in bench.meta_path.read_text().splitlines()]
    pool = json.loads(bench.pool_path.read_text())
    assert [m["id"] for m in meta] == [r["id"] for r in pool]
    fams = Counter(m["family"] for m in meta)
    assert set(fams) == set(FAMILY_SHARES)
    dups = [m for m in meta if "dup_of" in m]
    assert len(dups) == round(SMOKE.pool_size * SMOKE.p_duplicate)
    by_id = {r["id"]: r for r in pool}
    for m in dups:  # a duplicate is an exact copy of its original
        a, b = by_id[m["id"]], by_id[m["dup_of"]]
        assert a["conversations"] == b["conversations"] and a.get("image") == b.get("image")
    assert any(m.get("noise") == "label" for m in meta)


def test_no_val_or_test_item_in_pool(bench):
    pool = json.loads(bench.pool_path.read_text())
    pool_images = {r["image"] for r in pool if "image" in r}
    pool_pixels = {hashlib.sha1(np.asarray(Image.open(bench.image_root / p)).tobytes()).hexdigest() for p in pool_images}
    seen_eval = set()
    for task in TASK_NAMES:
        for split in ("val", "test"):
            recs = json.loads(bench.task_path(task, split).read_text())
            assert recs, (task, split)
            for r in recs:
                assert r["image"] not in pool_images, (task, split, r["id"])
                px = hashlib.sha1(np.asarray(Image.open(bench.image_root / r["image"])).tobytes()).hexdigest()
                assert px not in pool_pixels, (task, split, r["id"])
                if task != "mme":  # MME asks two questions of one image
                    assert r["image"] not in seen_eval
                seen_eval.add(r["image"])


def test_task_sizes_and_metric_fields(bench):
    for task in TASK_NAMES:
        test = json.loads(bench.task_path(task, "test").read_text())
        assert len(test) == SMOKE.n_test * (2 if task == "mme" else 1)
        for r in test:
            assert r["conversations"][-1]["value"] == r["answer"]
            if task in ("mmbench_en", "mmbench_cn", "sqa"):
                assert r["options"][r["answer_index"]] and r["answer"] in "ABCD"
    mme = json.loads(bench.task_path("mme", "val").read_text())
    assert {r["subtask"] for r in mme} == {"existence", "count", "position", "color", "ocr"}
    pope = json.loads(bench.task_path("pope", "test").read_text())
    assert Counter(r["answer"] for r in pope) == {"yes": 10, "no": 10}
