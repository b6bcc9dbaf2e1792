"""Feature extraction and task scores against computations written out independently."""
import numpy as np
import pytest
import torch

from icons.data.encode import Encoder, collate
from icons.features.extract import extract
from icons.features.store import load_group_scores
from icons.features.grads import reference_grads
from icons.features.projection import Rademacher
from icons.influence import MERGE, combine_checkpoints, direct_scores, group_means, task_table

from .tiny_lora import LORA, random_moments, tiny_lora_model


def _rec(i, q, a, task=None, subtask=None):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if task:
        r["task"] = task
    if subtask:
        r["subtask"] = subtask
    return r


POOL = [_rec(i, q, a) for i, (q, a) in enumerate([
    ("What is 3 plus 4 ?", "3 plus 4 is 7 ."), ("Is 5 even or odd ?", "5 is odd ."),
    ("Does a circle have corners ?", "No , a circle has no corners ."), ("What is 9 minus 2 ?", "9 minus 2 is 7 ."),
    ("Which is larger , 2 or 8 ?", "8 is larger than 2 ."), ("How many sides does a square have ?", "A square has 4 sides .")])]
VAL = [_rec(10, "What is 1 plus 1 ?", "1 plus 1 is 2 .", "math"), _rec(11, "What is 6 minus 1 ?", "6 minus 1 is 5 .", "math"),
       _rec(12, "Does a square have corners ?", "Yes , a square has corners .", "shapes", "corners"),
       _rec(13, "How many sides does a triangle have ?", "A triangle has 3 sides .", "shapes", "sides")]


@pytest.fixture(scope="module")
def setup():
    tok, model = tiny_lora_model(LORA)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return tok, model, random_moments(model), names


def _expected(model, tok, names, moments):
    enc = Encoder(tok, 16, 32, 160)
    pool_g = reference_grads(model, collate([enc.encode(r) for r in POOL], tok.pad_token_id))
    val_g = reference_grads(model, collate([enc.encode(r) for r in VAL], tok.pad_token_id))
    m, v, info = moments
    mf = torch.cat([m[n].reshape(-1) for n in names])
    vf = torch.cat([v[n].reshape(-1) for n in names])
    b1, b2 = info["betas"]
    # LESS's Adam direction, written out as LESS's collect_grad_reps.py has it (eps inside the root, no
    # bias correction): (b1 m + (1-b1) g) / sqrt(b2 v + (1-b2) g^2 + eps)
    pool_adam = (b1 * mf + (1 - b1) * pool_g) / torch.sqrt(b2 * vf + (1 - b2) * pool_g ** 2 + info["eps"])
    return pool_g.double().numpy(), pool_adam.double().numpy(), val_g.double().numpy()


def test_adam_features_and_scores_match_written_out_computation(setup, tmp_path):
    tok, model, moments, names = setup
    enc = Encoder(tok, 16, 32, 160)
    extract(model, enc, POOL, VAL, tmp_path, moments, "none", 0, 0, batch_size=4)
    scores, groups, ids = load_group_scores(tmp_path)
    assert ids == [r["id"] for r in POOL]
    assert groups == ["math", "shapes/corners", "shapes/sides", MERGE]
    _, pool_adam, val_g = _expected(model, tok, names, moments)
    want = {"math": direct_scores(pool_adam, val_g[:2]), "shapes/corners": direct_scores(pool_adam, val_g[2:3]),
            "shapes/sides": direct_scores(pool_adam, val_g[3:4]), MERGE: direct_scores(pool_adam, val_g)}
    for j, g in enumerate(groups):
        np.testing.assert_allclose(scores[:, j], want[g], rtol=1e-4, atol=1e-6)
    # sub-tasks: the task score is the max over its sub-tasks
    table = task_table(scores, groups, ["math", "shapes"])
    np.testing.assert_allclose(table[:, 1], np.maximum(want["shapes/corners"], want["shapes/sides"]), rtol=1e-4, atol=1e-6)


def test_sgd_features_use_plain_gradients(setup, tmp_path):
    tok, model, moments, names = setup
    extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, None, "none", 0, 0, batch_size=3)
    scores, groups, _ = load_group_scores(tmp_path)
    pool_g, _, val_g = _expected(model, tok, names, moments)
    np.testing.assert_allclose(scores[:, groups.index("math")], direct_scores(pool_g, val_g[:2]), rtol=1e-4, atol=1e-6)


def test_projected_features_are_stored_and_scored_consistently(setup, tmp_path):
    tok, model, moments, _ = setup
    extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, moments, "rademacher", 256, 7, batch_size=4)
    scores, groups, _ = load_group_scores(tmp_path)
    pool = np.load(tmp_path / "pool.npy")
    val = np.load(tmp_path / "val.npy")
    np.testing.assert_allclose(np.linalg.norm(pool, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scores[:, groups.index("math")], direct_scores(pool, val[:2]), rtol=1e-4, atol=1e-6)


def test_resume_gives_same_bytes(setup, tmp_path):
    tok, model, moments, _ = setup
    enc = Encoder(tok, 16, 32, 160)
    extract(model, enc, POOL, VAL, tmp_path / "a", moments, "none", 0, 0, batch_size=2)
    # an interrupted run: rows beyond the first half never written, mask says so
    extract(model, enc, POOL, VAL, tmp_path / "b", moments, "none", 0, 0, batch_size=2)
    scores = np.lib.format.open_memmap(tmp_path / "b" / "pool_scores.npy", mode="r+")
    done = np.load(tmp_path / "b" / "pool_done.npy")
    scores[3:] = 0.0
    scores.flush()
    done[3:] = False
    np.save(tmp_path / "b" / "pool_done.npy", done)
    with pytest.raises(ValueError, match="no features yet"):
        load_group_scores(tmp_path / "b")
    extract(model, enc, POOL, VAL, tmp_path / "b", moments, "none", 0, 0, batch_size=2)
    assert (tmp_path / "a" / "pool_scores.npy").read_bytes() == (tmp_path / "b" / "pool_scores.npy").read_bytes()


def test_rademacher_is_seeded_and_keeps_inner_products():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(20, 5000)), dtype=torch.float32)
    p1, p2 = Rademacher(5000, 2048, seed=3), Rademacher(5000, 2048, seed=3)
    a, b = p1(x), p2(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, Rademacher(5000, 2048, seed=4)(x))
    exact = (x @ x.T).numpy()
    approx = (a @ a.T).numpy()
    norms = np.linalg.norm(x.numpy(), axis=1)
    err = np.abs(approx - exact) / np.outer(norms, norms)
    # Johnson-Lindenstrauss: error of order 1/sqrt(dim) (0.022 here); 5 sigma bound
    assert err.max() < 5 / np.sqrt(2048)


def test_scores_equal_direct_n_by_v_computation():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(50, 30))
    val = rng.normal(size=(7, 30))
    normed = torch.tensor(val / np.linalg.norm(val, axis=1, keepdims=True), dtype=torch.float32)
    means = group_means(normed, ["t"] * 7, ["t", MERGE]).double().numpy()
    p = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    np.testing.assert_allclose(p @ means[0], direct_scores(pool, val), rtol=1e-5)


def test_checkpoint_weights_are_normalised_learning_rates():
    a, b = np.ones((3, 2)), np.zeros((3, 2))
    np.testing.assert_allclose(combine_checkpoints([a, b], [3e-4, 1e-4]), 0.75 * np.ones((3, 2)))


def _whole_model_reference(model, tok, moments, projection, dim, seed, batch_size):
    """The whole-model path, written out: the (B, D) gradient, Adam on the flat vector with the
    concatenated moments, the projection of the concatenation, then normalise and score."""
    from icons.features.plan import batch_plan
    from icons.features.grads import PerExampleGrads
    from icons.features.projection import make_projection
    from icons.influence import adam_precondition, group_of, normalise_rows

    enc = Encoder(tok, 16, 32, 160)
    with PerExampleGrads(model) as pe:
        proj = make_projection(projection, pe.dim, dim, seed, layout=[(n, tuple(p.shape)) for n, p in pe.params])
        groups = sorted({group_of(r) for r in VAL}) + [MERGE]
        v_items = [enc.encode(r) for r in VAL]
        v = torch.zeros(len(VAL), proj.dim)
        for idx in batch_plan([len(e.input_ids) for e in v_items], batch_size):
            g, _ = pe(collate([v_items[i] for i in idx], tok.pad_token_id))
            v[idx] = normalise_rows(proj(g))
        means = group_means(v, [group_of(r) for r in VAL], groups)
        p_items = [enc.encode(r) for r in POOL]
        feats = torch.zeros(len(POOL), proj.dim)
        for idx in batch_plan([len(e.input_ids) for e in p_items], batch_size):
            g, _ = pe(collate([p_items[i] for i in idx], tok.pad_token_id))
            if moments is not None:
                m, vv, info = moments
                mf = torch.cat([m[n].reshape(-1) for n in pe.names])
                vf = torch.cat([vv[n].reshape(-1) for n in pe.names])
                g = adam_precondition(g, mf, vf, *info["betas"], info["eps"])
            feats[idx] = normalise_rows(proj(g))
    return means.numpy(), v.numpy(), (feats @ means.T).numpy(), feats.numpy()


@pytest.mark.parametrize("projection", ["none", "rademacher", "kronecker"])
@pytest.mark.parametrize("gradient", ["adam", "sgd"])
def test_streamed_per_matrix_extraction_equals_whole_model_path(setup, tmp_path, projection, gradient):
    tok, model, moments, _ = setup
    mom = moments if gradient == "adam" else None
    extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, mom, projection, 128, 5, batch_size=4)
    means, val, scores, feats = _whole_model_reference(model, tok, mom, projection, 128, 5, batch_size=4)
    got, _, _ = load_group_scores(tmp_path)
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "val_means.npy"), means, rtol=1e-5, atol=1e-7)
    if projection != "none":
        np.testing.assert_allclose(np.load(tmp_path / "pool.npy"), feats, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / "val.npy"), val, rtol=1e-5, atol=1e-6)
    else:
        assert not (tmp_path / "pool.npy").exists()
    assert np.abs(scores).max() > 1e-3  # not trivially zero


def test_token_budget_batches_give_the_same_scores(setup, tmp_path):
    tok, model, moments, _ = setup
    enc = Encoder(tok, 16, 32, 160)
    extract(model, enc, POOL, VAL, tmp_path / "a", moments, "none", 0, 0, batch_size=4)
    from icons.features.plan import batch_plan

    lengths = [min(enc.length(r), enc.max_length) for r in POOL]
    assert batch_plan(lengths, 4, max_tokens=40) != batch_plan(lengths, 4)  # the budget splits batches
    meta = extract(model, enc, POOL, VAL, tmp_path / "b", moments, "none", 0, 0, batch_size=4, max_tokens=40)
    assert meta["complete"] and meta["max_tokens"] == 40
    np.testing.assert_allclose(np.load(tmp_path / "b" / "pool_scores.npy"), np.load(tmp_path / "a" / "pool_scores.npy"),
                               rtol=1e-5, atol=1e-6)


def test_resumed_extraction_progress_bar_starts_where_the_run_left_off(setup, tmp_path, monkeypatch):
    """A killed feature stage resumes from its done mask; Lightning's bar counts the batches done."""
    from icons import predict

    tok, model, moments, _ = setup
    enc = Encoder(tok, 16, 32, 160)
    extract(model, enc, POOL, VAL, tmp_path, moments, "none", 0, 0, batch_size=2)  # 3 pool batches
    first = load_group_scores(tmp_path)[0].copy()
    done = np.load(tmp_path / "pool_done.npy")
    done[[0, 3]] = False  # two rows of (at most) two batches were lost
    np.save(tmp_path / "pool_done.npy", done)
    (tmp_path / "meta.json").unlink()
    seen = []
    real = predict.ResumedProgressBar.on_predict_batch_start

    def record(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        real(self, trainer, pl_module, batch, batch_idx, dataloader_idx)
        seen.append((self.label, self.predict_progress_bar.initial, self.predict_progress_bar.total))

    monkeypatch.setattr(predict.ResumedProgressBar, "on_predict_batch_start", record)
    meta = extract(model, enc, POOL, VAL, tmp_path, moments, "none", 0, 0, batch_size=2)
    pool_bars = {(i, t) for label, i, t in seen if label == "features: pool"}
    todo = meta["rows_done"] // 2
    assert pool_bars == {(3 - todo, 3)} and 1 <= todo <= 2
    np.testing.assert_allclose(load_group_scores(tmp_path)[0], first, rtol=1e-5, atol=1e-7)


def test_adam_direction_is_lesss_with_eps_inside_the_root(setup, tmp_path):
    """LESS computes m1 / sqrt(v1 + eps) (collect_grad_reps.py); with second moments far below eps,
    as a 7B LoRA's are, m1 / (sqrt(v1) + eps) gives another direction. Moments here are that small."""
    tok, model, (m, v, info), names = setup
    tiny_v = {n: t * 1e-7 for n, t in v.items()}  # v ~ 1e-12, eps 1e-8
    extract(model, Encoder(tok, 16, 32, 160), POOL, VAL, tmp_path, (m, tiny_v, info), "none", 0, 0, batch_size=4)
    scores, groups, _ = load_group_scores(tmp_path)
    pool_g, _, val_g = _expected(model, tok, names, (m, v, info))
    mf = np.concatenate([m[n].reshape(-1).double().numpy() for n in names])
    vf = np.concatenate([tiny_v[n].reshape(-1).double().numpy() for n in names])
    b1, b2 = info["betas"]
    m1, v1 = b1 * mf + (1 - b1) * pool_g, b2 * vf + (1 - b2) * pool_g ** 2
    less = m1 / np.sqrt(v1 + info["eps"])  # written out independently of influence.adam_precondition
    other = m1 / (np.sqrt(v1) + info["eps"])
    merge = scores[:, groups.index(MERGE)]
    np.testing.assert_allclose(merge, direct_scores(less, val_g), rtol=1e-4, atol=1e-6)
    assert np.abs(merge - direct_scores(other, val_g)).max() > 1e-2  # the two forms are told apart here
