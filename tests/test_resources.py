"""Resources: a clear stop when the feature store does not fit on disk; out-of-memory batches are
split in halves (down to single examples) and give the same rows as the un-split computation."""
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from icons.data.encode import Encoder
from icons.features import extract as extract_mod
from icons.features.extract import extract
from icons.features.store import load_group_scores
from icons.features.grads import PerExampleGrads
from icons.io import ResourceError

from .tiny_lora import LORA, random_moments, tiny_lora_model
Usage = namedtuple("Usage", "total used free")


def _rec(i, q, a, task=None):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if task:
        r["task"] = task
    return r


POOL = [_rec(i, f"What is {i} plus {i % 4} ?", f"{i} plus {i % 4} is {i + i % 4} ." + " yes" * (i % 5))
        for i in range(11)]
VAL = [_rec(100, "What is 1 plus 1 ?", "1 plus 1 is 2 .", "math"), _rec(101, "Is 5 odd ?", "5 is odd .", "odd"),
       _rec(102, "What is 6 minus 1 ?", "6 minus 1 is 5 .", "math")]


@pytest.fixture(scope="module")
def setup():
    tok, model = tiny_lora_model(LORA)
    return tok, model, random_moments(model)


# ---------------------------------------------------------------- disk space
@pytest.mark.parametrize("projection,dim", [("rademacher", 64), ("none", 0)])
def test_feature_store_larger_than_free_disk_stops_with_one_line(setup, tmp_path, monkeypatch, projection, dim):
    tok, model, moments = setup
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 10 ** 9 - 100, 100))
    with pytest.raises(ResourceError) as info:
        extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, moments, projection, dim, 3, batch_size=4)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("not enough disk space for the feature store")
    n, groups = len(POOL), 3  # math, odd, the merge union
    need = n * groups * 4 + (n * dim * 4) + n
    assert f"needs {need} B ({need} bytes)" in msg or f"needs {need / 1024:.1f} KiB ({need} bytes)" in msg
    assert msg.endswith(", 100 B (100 bytes) free")
    assert not (tmp_path / "pool_scores.npy").exists() and not (tmp_path / "pool.npy").exists()


def test_enough_disk_space_goes_ahead(setup, tmp_path, monkeypatch):
    tok, model, moments = setup
    seen = []
    real = shutil.disk_usage

    def usage(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, moments, "rademacher", 64, 3, batch_size=4)
    assert seen and load_group_scores(tmp_path)[0].shape == (len(POOL), 3)


# ---------------------------------------------------------------- out of memory
def _oom_above(monkeypatch, limit: int, error):
    """Make the per-example gradient call run out of memory for batches above ``limit`` rows."""
    real = PerExampleGrads.backward
    sizes = []

    def backward(self, batch):
        b = batch["input_ids"].shape[0]
        sizes.append(b)
        if b > limit:
            raise error
        return real(self, batch)

    monkeypatch.setattr(PerExampleGrads, "backward", backward)
    return sizes


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "not enough memory: you tried to allocate 9 bytes; out of memory")],
                         ids=["cuda_oom", "runtime_oom"])
@pytest.mark.parametrize("projection,dim", [("rademacher", 64), ("none", 0)])
def test_oom_batches_are_split_and_equal_the_unsplit_run(setup, tmp_path, monkeypatch, error, projection, dim):
    tok, model, moments = setup
    enc = Encoder(tok, 16, 32, 160)
    ref = extract(model, enc, POOL, VAL, tmp_path / "ref", moments, projection, dim, 3, batch_size=8)
    assert ref["oom_retries"] == 0
    sizes = _oom_above(monkeypatch, 1 if projection == "none" else 3, error)
    meta = extract(model, enc, POOL, VAL, tmp_path / "oom", moments, projection, dim, 3, batch_size=8)
    # validation: one batch of 3; pool: batches of 8 and 3. A batch of b rows split down to batches of
    # at most `limit` rows: limit 3 -> 8 = 4+4 = (2+2)+(2+2): 3 splits; limit 1 -> b-1 splits each
    limit = 1 if projection == "none" else 3
    assert sizes.count(1) >= (len(POOL) + len(VAL) if limit == 1 else 0)
    expected = {("rademacher", 64): 3, ("none", 0): 2 + 7 + 2}[(projection, dim)]
    assert meta["oom_retries"] == expected  # recorded in meta.json
    assert extract_mod.read_json(tmp_path / "oom" / "meta.json")["oom_retries"] == expected
    a, groups, ids = load_group_scores(tmp_path / "ref")
    b, groups_b, ids_b = load_group_scores(tmp_path / "oom")
    assert (groups, ids) == (groups_b, ids_b) and np.load(tmp_path / "oom" / "pool_done.npy").all()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)  # every example whole, same rows
    if projection != "none":
        np.testing.assert_allclose(np.load(tmp_path / "oom" / "pool.npy"), np.load(tmp_path / "ref" / "pool.npy"),
                                   rtol=1e-4, atol=1e-6)


def test_single_example_that_does_not_fit_is_not_truncated_but_raises(setup, tmp_path, monkeypatch):
    tok, model, moments = setup
    _oom_above(monkeypatch, 0, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, moments, "rademacher", 64, 3, batch_size=4)


def test_other_errors_are_not_retried(setup, tmp_path, monkeypatch):
    tok, model, moments = setup
    sizes = _oom_above(monkeypatch, 1, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, moments, "rademacher", 64, 3, batch_size=4)
    assert len(sizes) == 1
