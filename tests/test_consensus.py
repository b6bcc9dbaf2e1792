"""Generalist stage against hand-worked cases."""
import numpy as np
import pytest

from icons.consensus import resample, select, task_ranks, thresholds, votes

# Two tasks, five pool examples (worked by hand below).
S = np.array([[0.9, 0.2], [0.1, 0.8], [0.5, 0.6], [0.7, 0.4], [0.3, 0.9]])


def test_threshold_is_an_exact_order_statistic():
    # 60th percentile, method 'higher': position 0.6*(5-1)=2.4 -> sorted[3]
    assert thresholds(S, 60).tolist() == [0.7, 0.8]
    # 80th percentile of 10 values keeps exactly the top 2
    col = np.arange(10.0)[:, None]
    assert thresholds(col, 80).tolist() == [8.0]
    assert votes(col, 80).tolist() == [0] * 8 + [1, 1]


def test_votes_by_hand():
    # task 0: rows 0 (0.9) and 3 (0.7) reach 0.7; task 1: rows 1 (0.8) and 4 (0.9) reach 0.8
    assert votes(S, 60).tolist() == [1, 1, 0, 1, 1]


def test_ranks_by_hand():
    assert task_ranks(S).tolist() == [[0, 4], [4, 1], [2, 2], [1, 3], [3, 0]]
    tied = np.array([[1.0], [1.0], [0.5]])
    assert task_ranks(tied).ravel().tolist() == [0, 0, 2]


def test_boundary_ties_broken_by_mean_rank_then_index():
    # rows 0,1,3,4 all have one vote; mean ranks 2.0, 2.5, 2.0, 1.5 -> row 4, then rows 0 and 3
    # tie at 2.0 and the lower index (0) wins.
    assert select(S, 0.4, "vote", 60).tolist() == [0, 4]
    assert select(S, 0.4, "vote", 60, tie_break="index").tolist() == [0, 1]
    r1 = select(S, 0.4, "vote", 60, tie_break="random", seed=3)
    assert r1.tolist() == select(S, 0.4, "vote", 60, tie_break="random", seed=3).tolist()
    assert set(r1) <= {0, 1, 3, 4}


def test_budget_is_exact_and_sorted():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(1003, 4))
    for ratio in (0.05, 0.1, 0.2, 0.6, 1.0):
        sel = select(s, ratio)
        assert len(sel) == int(ratio * 1003)
        assert (np.diff(sel) > 0).all()
    # a constant score column: ties everywhere, still exactly the budget
    assert len(select(np.zeros((10, 3)), 0.3)) == 3


def test_threshold_independent_of_budget():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(200, 3))
    v = votes(s, 80)
    small, large = set(select(s, 0.1).tolist()), set(select(s, 0.6).tolist())
    assert small <= large  # one ranking, cut at different budgets
    # at 60% every example with a vote is in, and the 80th-percentile threshold did not move
    assert set(np.flatnonzero(v > 0)) <= large and v.sum() == 3 * 40


def test_aggregation_ablations_by_hand():
    # means .55 .45 .55 .55 .6 -> row 4, then rows 0/2/3 tie at .55 with equal mean rank -> row 0
    assert select(S, 0.4, "mean").tolist() == [0, 4]
    assert select(S, 0.2, "max").tolist() == [4]     # 0.9 twice: rows 0 and 4 tie; mean rank 1.5 < 2.0
    assert select(S, 0.2, "rank").tolist() == [4]    # mean ranks 2, 2.5, 2, 2, 1.5
    z = (S - S.mean(0)) / S.std(0)
    assert select(S, 0.2, "norm").tolist() == [int(np.argmax(z.mean(1)))]


def test_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        select(S, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        select(np.array([[np.nan]]), 0.5)
    with pytest.raises(ValueError, match="consensus method"):
        select(S, 0.5, "median")


# ---------------------------------------------------------------- consensuses that keep each task's top
HAND = np.array([[4, 0], [3, 3], [2, 0], [0, 4], [0, 2], [1, 1]], dtype=float)  # rows x (task 0, task 1)


def test_round_robin_gives_each_task_its_own_best_in_turn():
    # task 0 takes row 0 (4), task 1 row 3 (4), task 0 row 1 (3), task 1: row 1 is taken -> row 4 (2)
    assert select(HAND, 4 / 6, method="round_robin").tolist() == [0, 1, 3, 4]
    assert select(HAND, 3 / 6, method="round_robin").tolist() == [0, 1, 3]


def test_balanced_fills_the_task_furthest_behind_in_summed_z_score():
    # z (population std): task 0 [1.565, .894, .224, -1.118, -1.118, -.447], task 1 [-1.118, .894, -1.118,
    # 1.565, .224, -.447]. Sums start 0, 0: task 0 takes row 0 -> (1.565, -1.118); task 1 is behind: row 3 ->
    # (.447, .447); a tie goes to task 0: row 1 -> (1.341, 1.341); tie again: task 0's next, row 2.
    # Row 1 serves task 1 too, so task 1 does not need row 4 as it does under round_robin.
    assert select(HAND, 4 / 6, method="balanced").tolist() == [0, 1, 2, 3]


def test_round_robin_breaks_a_tasks_ties_by_votes():
    scores = np.array([[1.0, 0.0, 0.0], [1.0, 0.9, 0.9], [0.0, 0.1, 0.1], [0.0, 0.2, 0.2]])
    # task 0 ties rows 0 and 1; row 1 has more votes (in the top of tasks 1 and 2 too) and goes first
    assert select(scores, 1 / 4, method="round_robin", threshold_percentile=50).tolist() == [1]


@pytest.mark.parametrize("method", ["round_robin", "balanced", "resample", "stratified"])
def test_greedy_consensus_exact_budget_and_deterministic(method):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(500, 7))
    a = select(scores, 0.2, method=method)
    assert len(a) == 100 == len(set(a.tolist())) and np.array_equal(a, select(scores, 0.2, method=method))
    assert a.tolist() == sorted(a.tolist())


def test_resample_draws_a_tasks_record_with_probability_exp_z():
    # one task, z = (-1.2247, 0, 1.2247): the first draw is row i with probability softmax(z)_i
    scores = np.array([[0.0], [1.0], [2.0]])
    z = (scores[:, 0] - 1.0) / np.sqrt(2 / 3)
    expected = np.exp(z) / np.exp(z).sum()
    firsts = np.bincount([int(select(scores, 1 / 3, "resample", seed=s)[0]) for s in range(3000)], minlength=3)
    assert np.abs(firsts / 3000 - expected).max() < 0.03, (firsts / 3000, expected)


def test_resample_gives_each_task_its_turn_and_follows_the_seed():
    # task 0 scores rows 0-49 high (z +1, the rest -1), task 1 rows 50-99. Turns alternate (resample
    # returns rows in draw order); a task's draw lands in its own half with probability e / (e + 1/e)
    scores = np.zeros((100, 2))
    scores[:50, 0] = 50.0
    scores[50:, 1] = 50.0
    own = [np.mean([(r < 50) == (t % 2 == 0) for t, r in enumerate(resample(scores, 20, seed=s))])
           for s in range(200)]
    assert abs(np.mean(own) - np.e / (np.e + 1 / np.e)) < 0.02
    a = select(scores, 0.2, "resample", seed=1)
    assert np.array_equal(a, select(scores, 0.2, "resample", seed=1))
    assert not np.array_equal(a, select(scores, 0.2, "resample", seed=2))


def test_stratified_keeps_each_profiles_share_and_votes_inside():
    # rows 0-5 help task 0, rows 6-7 task 1. 75th-percentile thresholds: task 0 at 10 (rows 0, 1), task 1
    # at 4 (rows 6, 7): the vote's top 4 is rows 0, 1, 6, 7. Two strata of 6 and 2 rows get 3 and 1 of the
    # 4: rows 0, 1 (a vote each), then row 2 (mean rank 2 like row 3; lower index); row 6 (mean rank 3
    # against row 7's 3.5).
    scores = np.array([[10, 0], [10, 0], [9, 0], [9, 0], [8, 0], [8, 0], [0, 5], [0, 4]], dtype=float)
    assert select(scores, 0.5, "vote", threshold_percentile=75).tolist() == [0, 1, 6, 7]
    assert select(scores, 0.5, "stratified", threshold_percentile=75, strata=2).tolist() == [0, 1, 2, 6]


def test_one_stratum_is_the_vote():
    scores = np.random.default_rng(5).normal(size=(300, 6))
    assert np.array_equal(select(scores, 0.2, "stratified", strata=1), select(scores, 0.2, "vote"))
