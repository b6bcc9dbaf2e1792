"""Data-parallel extraction: two CPU processes (gloo) write the same store as one process, in place."""
import numpy as np
import pytest

from icons.features.plan import batch_plan, shard_plan
from icons.features.store import load_group_scores
from icons.distributed import dist_env, spawn

from .tiny_lora import LORA, random_moments, tiny_lora_model
QA = [("What is 3 plus 4 ?", "3 plus 4 is 7 ."), ("Is 5 even or odd ?", "5 is odd ."),
      ("Does a circle have corners ?", "No , a circle has no corners ."), ("What is 9 minus 2 ?", "9 minus 2 is 7 ."),
      ("Which is larger , 2 or 8 ?", "8 is larger than 2 ."), ("How many sides does a square have ?", "A square has 4 sides ."),
      ("What is 1 plus 1 ?", "2 ."), ("Is 4 even ?", "Yes , 4 is even ."), ("What is 7 minus 3 ?", "7 minus 3 is 4 ."),
      ("Does a triangle have corners ?", "Yes , a triangle has 3 corners .")]


def _rec(i, q, a, task=None):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if task:
        r["task"] = task
    return r


POOL = [_rec(i, q, a) for i, (q, a) in enumerate(QA)]
VAL = [_rec(20, "What is 2 plus 2 ?", "2 plus 2 is 4 .", "math"),
       _rec(21, "How many sides does a triangle have ?", "A triangle has 3 sides .", "shapes")]


def _job(rank, world_size, runs):
    """One process of extraction jobs (module level: spawned processes import it). Builds the same
    tiny model in every process (seeded), then runs ``runs``: ``(out_dir, projection, only_rank)``
    in order; ``only_rank`` set: just that rank's share of a 2-way job, without waiting for the
    other rank (a job whose other rank died)."""
    from icons.data.encode import Encoder
    from icons.features.extract import extract
    from icons.features.extract import extract_distributed

    tok, model = tiny_lora_model(LORA)
    moments = random_moments(model)
    for out_dir, projection, only_rank in runs:
        args = (model, Encoder(tok, 16, 32, 160), POOL, VAL, out_dir, moments, projection, 64, 3)
        if only_rank is not None:
            meta = extract(*args, batch_size=2, rank=only_rank, world_size=2)
            assert not meta["complete"]
        else:
            meta = extract_distributed(*args, batch_size=2)
            assert meta["complete"] and meta["n_pool"] == len(POOL)
            assert dist_env()[:2] == (rank, world_size)


FILES = ("pool_scores.npy", "pool_done.npy", "val_means.npy", "pool_meta.json", "pool_ids.json", "groups.json")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One process: reference stores (exact and kronecker) and rank 0's share of a 2-way job
    whose rank 1 died; then two processes: the same stores, and the interrupted job resumed."""
    root = tmp_path_factory.mktemp("sharded")
    spawn(_job, 1, ([(root / "one-none", "none", None), (root / "one-kronecker", "kronecker", None),
                     (root / "dead", "none", 0)],), threads=1)
    interrupted = {"done": np.load(root / "dead" / "pool_done.npy"),
                   "scores": np.load(root / "dead" / "pool_scores.npy"),
                   "meta": (root / "dead" / "meta.json").exists()}
    try:
        load_group_scores(root / "dead")
        interrupted["loads"] = True
    except ValueError as e:
        interrupted["loads"] = str(e)
    spawn(_job, 2, ([(root / "two-none", "none", None), (root / "two-kronecker", "kronecker", None),
                     (root / "dead", "none", None)],), threads=1)
    return root, interrupted


def _same_store(a, b, projection):
    for name in FILES + (("pool.npy", "val.npy") if projection != "none" else ()):
        # bytes, not allclose: every batch is computed by the same code on the same rows with
        # one thread in every process, whichever process runs it
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("projection", ["none", "kronecker"])
def test_two_processes_write_the_same_store_as_one(stores, projection):
    root, _ = stores
    _same_store(root / f"one-{projection}", root / f"two-{projection}", projection)
    scores, _, ids = load_group_scores(root / f"two-{projection}")
    assert ids == [r["id"] for r in POOL] and np.isfinite(scores).all() and (scores != 0).all()
    assert (root / f"two-{projection}" / "meta.json").exists()
    assert not list((root / f"two-{projection}").glob("*rank*"))  # one shared store, nothing to merge


def test_a_job_with_a_dead_rank_resumes(stores):
    root, interrupted = stores
    done = interrupted["done"]
    assert 0 < done.sum() < len(POOL)  # rank 0's rows only
    assert not interrupted["meta"] and "no features yet" in interrupted["loads"]
    assert (interrupted["scores"][~done] == 0).all() and (interrupted["scores"][done] != 0).all()
    # rerun as a 2-process job: rank 0 finds its rows done, rank 1 fills in the rest
    _same_store(root / "one-none", root / "dead", "none")
    assert (root / "dead" / "meta.json").exists()


def test_shards_cover_the_plan_once():
    plan = batch_plan([5, 3, 9, 1, 7, 2, 8], 2)
    shards = [shard_plan(plan, r, 3) for r in range(3)]
    rows = sorted(i for s in shards for b in s for i in b)
    assert rows == list(range(7))
    assert shards[0] == [plan[0], plan[3]]
    with pytest.raises(ValueError):
        shard_plan(plan, 3, 3)


def test_batch_plan_respects_the_token_budget():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 200, size=300)]
    plan = batch_plan(lengths, 16, max_tokens=1000)
    assert plan == batch_plan(lengths, 16, max_tokens=1000)  # deterministic
    assert sorted(i for b in plan for i in b) == list(range(300))
    for b in plan:
        assert len(b) <= 16
        assert len(b) * max(lengths[i] for i in b) <= 1000 or len(b) == 1
    # greedy: a batch closes only when the next row would break the budget or the size
    for b, nxt in zip(plan, plan[1:]):
        assert len(b) == 16 or (len(b) + 1) * lengths[nxt[0]] > 1000
    # a row longer than the budget gets a batch of its own
    assert batch_plan([3, 50, 4], 8, max_tokens=20) == [[0, 2], [1]]
    # no budget: fixed-size batches, as before
    assert batch_plan(lengths, 16) == batch_plan(lengths, 16, max_tokens=10 ** 9)
    sizes = [len(b) for b in batch_plan(lengths, 16)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and sizes[-1] == 300 - 16 * (len(sizes) - 1)
