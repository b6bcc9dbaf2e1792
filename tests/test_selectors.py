"""The baseline selectors on hand-made cases whose right answer can be written down, each against
an independent computation written out here; the forward pass's per-example values against
their definitions."""
import numpy as np
import pytest
import torch

from icons.data.encode import IGNORE
from icons.selectors import baselines, stores_needed
from icons.selectors.forward import coincide_features, coincide_layers, example_stats, pooled
from icons.geometry import kmeans, knn, unit_rows


def test_length_picks_the_longest_answers():
    assert baselines.by_length(np.array([3, 10, 1, 10, 5]), 2).tolist() == [1, 3]
    assert baselines.by_length(np.array([3, 10, 1, 10, 5]), 3).tolist() == [1, 3, 4]


def test_bands_low_middle_high():
    rng = np.random.default_rng(0)
    values = rng.permutation(10).astype(float)  # row i holds value values[i]
    pick = lambda which, k: sorted(values[baselines.band(values, k, which)].tolist())  # noqa: E731
    assert pick("low", 4) == [0, 1, 2, 3]
    assert pick("high", 4) == [6, 7, 8, 9]
    assert pick("middle", 4) == [3, 4, 5, 6]  # ascending positions [10//2 - 2, 10//2 + 2)
    assert pick("middle", 3) == [4, 5, 6]  # [5 - 1, 5 + 2)
    with_nan = np.array([np.nan, 1.0, 2.0, 3.0])
    assert baselines.band(with_nan, 2, "low").tolist() == [1, 2]
    assert baselines.band(with_nan, 3, "high").tolist() == [1, 2, 3]  # NaN last, even at the high end
    with pytest.raises(ValueError, match="band must be one of"):
        baselines.band(values, 2, "top")


def test_semdedup_keeps_one_of_a_set_of_exact_duplicates():
    rng = np.random.default_rng(1)
    distinct = rng.normal(size=(6, 16))
    dup = rng.normal(size=(1, 16))
    x = np.concatenate([distinct[:3], dup, dup, dup, distinct[3:]])  # rows 3, 4, 5 the same record
    kept = baselines.semdedup(x, 7, clusters=2, seed=0)
    assert len(kept) == 7 and len(set(kept.tolist()) & {3, 4, 5}) == 1
    assert set(kept.tolist()) >= {0, 1, 2, 6, 7, 8}
    # a larger budget takes a second copy only once every distinct record is in
    assert len(set(baselines.semdedup(x, 8, clusters=2, seed=0).tolist()) & {3, 4, 5}) == 2


def test_semdedup_drops_the_closest_pair_member_and_keeps_the_one_far_from_the_centroid():
    # one cluster: a, a' (nearly a) and b; a and a' are the near-duplicate pair; of the two, the one
    # farther from the centroid comes first in SemDeDup's order and is kept
    a = np.array([1.0, 0.0, 0.0])
    a2 = np.array([0.999, 0.0447, 0.0])
    b = np.array([0.0, 1.0, 0.0])
    x = np.stack([a, a2, b])
    centroid = unit_rows(x).sum(0)
    centroid = centroid / centroid.norm()
    far = int(np.argmin((unit_rows(x)[:2] @ centroid).numpy()))  # of a and a', the farther from the centroid
    kept = baselines.semdedup(x, 2, clusters=1, seed=0).tolist()
    assert kept == sorted([far, 2])


def _d2_by_hand(x, s, k, nb, gf, gr):
    """D2 pruning with dense matrices: an independent computation of the same definition."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.clip(2 - 2 * u @ u.T, 0, None))
    np.fill_diagonal(d, np.inf)
    adj = np.zeros_like(d, dtype=bool)
    for i in range(len(x)):
        adj[i, np.argsort(d[i], kind="stable")[:nb]] = True
    score = s + np.array([sum(np.exp(-gf * d[i, j]) * s[j] for j in np.nonzero(adj[i])[0]) for i in range(len(x))])
    sym = adj | adj.T
    taken, out = np.zeros(len(x), bool), []
    for _ in range(k):
        i = int(np.argmax(np.where(taken, -np.inf, score)))
        out.append(i)
        taken[i] = True
        for j in np.nonzero(sym[i])[0]:
            score[j] -= np.exp(-gr * d[i, j]) * score[i]
    return sorted(out)


def test_d2_pruning_equals_the_definition_computed_densely():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8))
    s = rng.uniform(0.1, 1.0, size=30)
    for k, nb, gf, gr in [(10, 3, 1.0, 0.4), (20, 5, 1.0, 0.0), (15, 4, 2.0, 0.1)]:
        got = baselines.d2_pruning(x, s, k, neighbours=nb, gamma_forward=gf, gamma_reverse=gr)
        assert got.tolist() == _d2_by_hand(x, s, k, nb, gf, gr), (k, nb, gf, gr)


def test_d2_pruning_spreads_over_a_cluster_of_hard_duplicates():
    # five near-copies of one hard record and five distinct easier ones: difficulty alone would take
    # the copies; the reverse message passing lowers a pick's neighbours, so the picks spread out
    rng = np.random.default_rng(3)
    hard = rng.normal(size=(1, 8)) + 1e-3 * rng.normal(size=(5, 8))
    easy = rng.normal(size=(5, 8))
    x = np.concatenate([hard, easy])
    s = np.array([1.0] * 5 + [0.6] * 5)
    picked = baselines.d2_pruning(x, s, 5, neighbours=4, gamma_forward=1.0, gamma_reverse=5.0).tolist()
    assert len(set(picked) & set(range(5))) < 5


def test_mmd_prototype_of_a_symmetric_set_is_its_centre():
    x = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert baselines.mmd_prototypes(x, 1, sigma=1.0) == [1]
    assert sorted(baselines.mmd_prototypes(x, 3, sigma=1.0)) == [0, 1, 2]


def test_coincide_gives_the_spread_cluster_more_than_the_dense_one():
    # two clusters, one of 20 near-identical records (dense: redundant), one of 20 spread out; their
    # centroids' cosine (0.69, under the 0.9 cut) is each one's transferability, so density decides:
    # without it the two would split the budget evenly
    rng = np.random.default_rng(4)
    centre_a, centre_b = np.r_[5.0, 2.0, np.zeros(6)], np.r_[2.0, 5.0, np.zeros(6)]
    dense = centre_a + 0.01 * rng.normal(size=(20, 8))
    spread = centre_b + 0.6 * rng.normal(size=(20, 8))
    x = np.concatenate([dense, spread])
    labels, _ = kmeans(unit_rows(x), 2, seed=0)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1 and labels[0] != labels[20]
    rows = baselines.coincide(x, 10, clusters=2, seed=0, tau=0.1, sigma=0.1)
    assert len(rows) == 10 and len(set(rows.tolist())) == 10
    assert (rows >= 20).all()
    assert rows.tolist() == baselines.coincide(x, 10, clusters=2, seed=0, tau=0.1, sigma=0.1).tolist()


def test_rds_scores_are_the_max_cosine_over_a_tasks_validation_records():
    pool = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    val = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    table = baselines.rds_table(pool, val, ["a", "a", "b"], ["a", "b"])
    r = 2 ** -0.5
    expected = np.array([[max(1, 0), r], [max(0, 1), -r], [max(r, r), 0.0]])
    np.testing.assert_allclose(table, expected, atol=1e-6)


def test_kmeans_and_knn_on_separated_points():
    x = unit_rows(np.array([[1, 0.01], [1, -0.01], [0.01, 1], [-0.01, 1]]))
    labels, _ = kmeans(x, 2, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    nbr, sim = knn(x, 1)
    assert nbr[:, 0].tolist() == [1, 0, 3, 2] and (sim[:, 0] > 0.99).all()


def test_el2n_ranks_a_wrong_answer_above_a_memorised_one_and_equals_its_formula():
    vocab = 5
    labels = torch.tensor([[IGNORE, 2, 3], [IGNORE, 2, 3]])
    logits = torch.zeros(2, 3, vocab)
    logits[0, 0, 2], logits[0, 1, 3] = 20.0, 20.0  # row 0: the answer memorised
    logits[1, 0, 4], logits[1, 1, 0] = 3.0, 3.0  # row 1: another answer more likely than the right one
    logits[1, 0, 2], logits[1, 1, 3] = 2.0, 1.0
    loss, el2n, n = example_stats(logits, labels)
    assert n.tolist() == [2, 2]
    assert el2n[1] > el2n[0] and loss[1] > loss[0]
    p = torch.softmax(logits[1, :2], -1)
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 3]), vocab).float()
    assert el2n[1].item() == pytest.approx((p - onehot).norm(dim=1).mean().item(), abs=1e-6)
    assert loss[1].item() == pytest.approx(-torch.log(p[[0, 1], [2, 3]]).mean().item(), rel=1e-5)
    assert el2n[0].item() == pytest.approx(0.0, abs=1e-6)
    no_answer = example_stats(logits[:1], torch.full((1, 3), IGNORE))
    assert torch.isnan(no_answer[0]).all()


def test_pooling_mean_and_position_weighted():
    h = torch.tensor([[[1.0], [2.0], [3.0], [9.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pooled(h, mask).item() == pytest.approx(2.0)
    assert pooled(h, mask, weighted=True).item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 3) / 6)


def test_coincide_features_split_image_and_text_tokens():
    ids = torch.tensor([[7, 4, 4, 8, 0]])  # image token 4; pad at the end
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = {0: torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 4.0], [3.0, 0.0], [5.0, 5.0]]])}
    f = coincide_features(out, [0], ids, mask, image_id=4)[0]
    image = torch.tanh(torch.tensor([0.0, 3.0]))
    text = torch.tanh(torch.tensor([2.0, 0.0]))
    expected = torch.cat([image / image.norm(), text / text.norm()]) / 2 ** 0.5
    torch.testing.assert_close(f, expected)
    assert f.norm().item() == pytest.approx(1.0)


def test_coincide_layers_follow_its_depths():
    assert coincide_layers(24, None) == [3, 7, 11, 15, 19]
    assert coincide_layers(4, None) == [0, 1, 2, 3]
    assert coincide_layers(32, None) == [4, 9, 15, 20, 25]
    with pytest.raises(ValueError, match="layers 0..3"):
        coincide_layers(4, [1, 4])


def test_stores_needed_by_the_configured_selectors():
    from icons.config.selector import BASELINE_CHOICES
    from icons.selectors import NEEDS, SELECTORS

    assert set(NEEDS) == set(SELECTORS) == set(BASELINE_CHOICES)
    assert stores_needed(["full", "random", "icons"]) == []
    assert stores_needed(["length"]) == []
    assert stores_needed(["el2n", "perplexity"]) == ["base", "warmup"]
    assert stores_needed(["clip_score", "rds"]) == ["base", "clip"]
