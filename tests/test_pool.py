"""The lazy pool: byte-offset index, records read by position, and the stages that use it
(tiny files in each pool format, written in tmp dirs; no model work)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from icons.data import llava_json
from icons.data import records as records_mod
from icons.data.llava_json import BadInputError, PoolFileError, iter_records, scan_file
from icons.data.pool import LazyPool, build_index, index_file
from icons.io import read_json
from icons.pipeline import Run, run_stages
from icons.stages import load_pool

from .conftest import compose_config
from .test_bad_input import png

SMALL = ["data.pool_size=240", "tasks=mini_llava_smoke", "tasks.n_val=4", "tasks.n_test=6", "logger=none"]


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def records() -> list[dict]:
    """Image and text-only, single- and multi-turn, <image> first / later / missing, non-ASCII text."""
    return [
        {"id": "img-first", "image": "a.png", "conversations": _turns(("<image>\nWhat colour?", "Red."))},
        {"id": "text-only", "conversations": _turns(("Say hi in French.", "Salut ! ça va ?"))},
        {"id": 7, "image": "b.png", "conversations": _turns(("Look.", "OK."), ("Which shape? <image>", "A square."),
                                                           ("And its colour?", "Blue."))},
        {"id": "multi-text", "conversations": _turns(("1 + 1?", "2"), ("Times 3?", "6"), ("中文?", "是的"))},
        {"id": "no-token", "image": "a.png", "conversations": _turns(("Describe it.", "A red square."))},
        {"id": "quotes", "conversations": _turns(('He said "hi" \\ {not json} [x]', "ok,\n]"))},
    ]


def repaired(recs: list[dict]) -> list[dict]:
    """LLaVA's repair, written out: the image record without ``<image>`` gets it first."""
    out = []
    for r in recs:
        if r["id"] == "no-token":
            first = r["conversations"][0]
            r = dict(r, conversations=[dict(first, value="<image>\n" + first["value"]), *r["conversations"][1:]])
        out.append(r)
    return out


def write_pool(path: Path, recs: list[dict], indent: int | None = None) -> Path:
    """``.jsonl`` (with a blank line and a CRLF line) or a ``.json`` list (compact or indented)."""
    if path.suffix == ".jsonl":
        lines = [json.dumps(r, ensure_ascii=False) for r in recs]
        lines.insert(2, "")
        text = "\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n"
        path.write_text(text, encoding="utf-8")
    else:
        path.write_text(json.dumps(recs, ensure_ascii=False, indent=indent), encoding="utf-8")
    return path


def plain_read(path: Path) -> list:
    """What the file holds, read the plain way (independent of the index)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


FORMATS = [("pool.jsonl", None), ("pool.json", None), ("pool.json", 2)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    return tmp_path


# ---------------------------------------------------------------- the index
@pytest.mark.parametrize("name,indent", FORMATS)
def test_index_reads_exactly_the_records_of_a_plain_read(tmp_path, name, indent):
    path = write_pool(tmp_path / name, records(), indent)
    index = build_index(path)
    assert index.shape == (len(records()), 3) and index.dtype == np.int64
    raw = path.read_bytes()
    expected = plain_read(path)
    assert expected == records()
    for (start, end, line), rec in zip(index.tolist(), expected):
        assert json.loads(raw[start:end]) == rec  # the span is the record's own bytes
        assert raw[:start].count(b"\n") + 1 == line
    pool = LazyPool(path, index_file(path, tmp_path / "idx"))
    assert len(pool) == len(expected)
    want = repaired(expected)  # as read: LLaVA's <image> repair on the one record without it, nothing else
    assert list(pool) == want
    assert [pool[i] for i in range(len(pool))] == want
    assert pool[-1] == want[-1] and pool[1:4] == want[1:4]
    assert pool.ids == [r["id"] for r in expected]
    with pytest.raises(IndexError):
        pool[len(pool)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_read_in_small_chunks_gives_the_same_records(tmp_path, monkeypatch, chunk):
    """Chunk edges fall inside multi-byte characters, strings, numbers and literals."""
    recs = records() + [{"id": "n", "x": [12345678901, -1.5e-3, True, False, None]}]
    path = write_pool(tmp_path / "pool.json", recs, indent=1)
    monkeypatch.setattr(records_mod, "CHUNK", chunk)
    assert [r for _, _, r, _ in iter_records(path)] == recs
    monkeypatch.undo()
    assert np.array_equal(build_index(path), build_index(path))


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write_pool(tmp_path / "pool.jsonl", records())
    cache = tmp_path / "run" / "data" / "index"
    built = []
    real = build_index

    def counting(p):
        built.append(p)
        return real(p)

    monkeypatch.setattr("icons.data.pool.build_index", counting)
    first = index_file(path, cache)
    assert index_file(path, cache) == first and len(built) == 1  # same path, size, mtime: reused
    longer = records() + [{"id": "new", "conversations": _turns(("q", "a"))}]
    write_pool(path, longer)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    again = index_file(path, cache)
    assert again == first and len(built) == 2  # rebuilt in place, no stale copy left
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, first.with_suffix(".json").name])
    assert list(LazyPool(path, again)) == repaired(plain_read(path)) and plain_read(path) == longer
    # same size, new mtime: rebuilt too
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    index_file(path, cache)
    assert len(built) == 3


def test_pool_of_kept_positions_and_ids(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", records())
    keep = np.asarray([0, 2, 5], dtype=np.int64)
    np.save(tmp_path / "keep.npy", keep)
    pool = LazyPool(path, index_file(path, tmp_path), tmp_path / "keep.npy", ids=["img-first", 7, "quotes"])
    assert [r["id"] for r in pool] == ["img-first", 7, "quotes"]
    assert [pool.file_position(k) for k in range(3)] == [0, 2, 5] and pool.file_positions().tolist() == [0, 2, 5]
    clone = pickle.loads(pickle.dumps(pool))  # worker processes reopen the file
    assert list(clone) == list(pool)


def test_changed_file_and_unreadable_record_are_refused(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", records())
    sig = llava_json.file_signature(path)
    index = index_file(path, tmp_path)
    path.write_text(path.read_text() + "\n")
    with pytest.raises(PoolFileError, match="run the data stage again"):
        LazyPool(path, index, signature=sig)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "conversations": []}\n{"id": "b", \n')
    pool = LazyPool(bad, index_file(bad, tmp_path))  # an unchecked file: the bad line is named when read
    with pytest.raises(BadInputError, match=r"bad.jsonl line 2 record 1: invalid JSON"):
        pool[1]


# ---------------------------------------------------------------- validation keeps no records
def test_scan_without_keeping_records_keeps_positions_and_ids(images):
    path = write_pool(images / "pool.jsonl", records() + [{"id": "bad", "image": "lost.png",
                                                           "conversations": _turns(("<image>\nq", "a"))}])
    res = scan_file(path, images, keep_records=False)
    assert res.records == [] and res.stats["ok"] == 6 and res.stats["bad"] == 1
    assert res.positions == list(range(6)) and res.ids == [r["id"] for r in records()]
    assert res.stats["fixes"] == {"image_token_inserted": 1} and res.stats["text_only"] == 3


# ---------------------------------------------------------------- the pool presets, through the stages
def _multiply(recs: list[dict], n: int) -> list[dict]:
    return [dict(r, id=f"{r['id']}-{k}") for k in range(n) for r in recs]


@pytest.mark.parametrize("preset,name,indent", [("cambrian_7m", "c7m.jsonl", None), ("llava_665k", "mix.json", None),
                                                ("vision_flan", "annotation.json", 1)])
def test_pool_presets_select_and_write_subsets_lazily(tmp_path, icons_cache, images, preset, name, indent):
    recs = _multiply(records(), 5)
    path = write_pool(images / name, recs, indent)
    cfg = compose_config([*SMALL, f"data={preset}", f"data.path={path}", f"data.image_root={images}",
                          "stages=[check,data,select,subset]", "selectors=[random]", "selection.ratio=0.4"])
    assert cfg.data.name == preset and cfg.data.kind == "llava_json"
    run = Run(cfg, tmp_path / "run", tmp_path / "run")
    run_stages(cfg, run.run_dir)
    m = read_json(run.run_dir / "data" / "manifest.json")
    assert m["pool"] == str(path) and m["counts"]["pool"] == len(recs) and Path(m["index"]).parent.name == "index"
    assert not (run.run_dir / "data" / "pool.json").exists()
    pool = load_pool(run)
    assert isinstance(pool, LazyPool) and pool.ids == [r["id"] for r in recs]
    sel = run.run_dir / "selection" / "random"
    ids, idx = read_json(sel / "ids.json"), np.load(sel / "indices.npy")
    subset = read_json(sel / "subset" / "subset.json")
    assert len(subset) == len(ids) == int(0.4 * len(recs))
    by_id = {r["id"]: r for r in recs}
    assert [r["id"] for r in subset] == ids and all(pool[int(i)]["id"] == rid for i, rid in zip(idx, ids))
    assert subset == [pool.raw(int(i)) for i in idx]  # the records exactly as in the file: no repair
    assert all(r == by_id[r["id"]] for r in subset)


def test_subset_refuses_an_index_whose_record_has_another_id(tmp_path):
    from icons.subset import write_subset

    path = write_pool(tmp_path / "pool.jsonl", records())
    pool = LazyPool(path, index_file(path, tmp_path))
    with pytest.raises(KeyError, match="holds id 'text-only'"):
        write_subset(pool, [0, 1], ["img-first", "quotes"], None, tmp_path / "sub")
    assert not (tmp_path / "sub" / "subset.json").exists()


def test_warmup_and_training_read_only_their_records(tmp_path, monkeypatch):
    """Warmup and training take their records by row, never a whole-pool copy."""
    path = write_pool(tmp_path / "pool.jsonl", _multiply(records(), 20))
    pool = LazyPool(path, index_file(path, tmp_path))
    ids = pool.ids
    read = []
    real = LazyPool._read
    monkeypatch.setattr(LazyPool, "_read", lambda self, pos, repair=True: read.append(pos) or real(self, pos, repair))
    assert [pool[k]["id"] for k in (37, 3, 100)] == [ids[37], ids[3], ids[100]]
    assert sorted(read) == [3, 37, 100]


def test_generated_pool_is_read_lazily_too(tmp_path, icons_cache):
    """The embedded default goes through the same lazy pool as a 7M-record file."""
    cfg = compose_config([*SMALL, "stages=[data]"])
    run = Run(cfg, tmp_path / "run", tmp_path / "run")
    run_stages(cfg, run.run_dir)
    m = read_json(run.run_dir / "data" / "manifest.json")
    pool = load_pool(run)
    assert list(pool) == read_json(m["pool"]) and len(pool) == 240 and m["positions"] is None
    assert m["meta"].endswith("pool_meta.jsonl") and set(m["val"]) == set(cfg.tasks.names) == set(m["test"])


def test_features_of_a_lazy_pool_equal_those_of_the_list(tmp_path):
    """The features stage takes the lazy pool in place of the list: same rows, same ids."""
    from icons.data.encode import Encoder
    from icons.features.extract import extract
    from icons.features.store import load_group_scores

    from .test_features import POOL, VAL
    from .tiny_lora import tiny_lora_model

    tok, model = tiny_lora_model()
    enc = Encoder(tok, 16, 32, 160)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    lazy = LazyPool(path, index_file(path, tmp_path / "index"))
    extract(model, enc, POOL, VAL, tmp_path / "list", None, "none", 0, 0, batch_size=4)
    extract(model, enc, lazy, VAL, tmp_path / "lazy", None, "none", 0, 0, batch_size=4)
    a, groups_a, ids_a = load_group_scores(tmp_path / "list")
    b, groups_b, ids_b = load_group_scores(tmp_path / "lazy")
    assert ids_a == ids_b == [r["id"] for r in POOL] and groups_a == groups_b
    assert np.array_equal(a, b)
