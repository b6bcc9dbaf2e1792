"""Generalist stage: turn an (N, K) table of per-task scores into one selection.

``vote`` (ICONS): each task's threshold is its ``threshold_percentile``-th percentile taken as an
exact order statistic (numpy ``method="higher"``, i.e. a value that occurs in the column); an
example gets one vote per task where its score is >= the threshold; examples are ranked by votes.
The threshold and the budget are separate settings (the released code tied them).

Ties at the budget boundary are broken deterministically:
- ``mean_rank`` (default): lower mean per-task rank first (rank 0 = best score of that task),
  then lower row index;
- ``index``: lower row index first;
- ``random``: a seeded random order.

Aggregation ablations of the paper: ``mean`` (mean of task scores), ``max`` (max over tasks),
``rank`` (mean per-task rank, lower is better), ``norm`` (mean of per-task z-scores). ``merge``
(one influence computation against the union of all validation sets) is computed by the scores
stage as a single column and ranked here like ``mean``.

Beyond the paper, two consensuses that keep what each task's specialist finds (the vote lets
records that many similar tasks like crowd out data only one task wants):

- ``round_robin``: per-task quotas. The tasks take turns, each adding its best-ranked record not yet
  taken (its own influence ranking; ties by votes, then mean per-task rank, then index), so every
  task gets ``budget / K`` records of its own top;
- ``balanced``: per-task normalisation, then filling the task that is furthest behind, as BIDS
  does (Dai et al., 2025): scores are z-scored per task; each step adds, for the task whose
  selected records have the lowest summed z-score so far, its best remaining record.

Two more that keep the pool's variety as well, since a subset of one kind of record (short answers)
hurts the tasks that need another (long ones) even when every task has its quota:

- ``resample``: per-task quotas as ``round_robin``, but each task draws its next record at random
  with probability proportional to ``exp(z)`` (its z-scored score) instead of taking its best:
  importance resampling, as DSIR does (Xie et al., 2023), drawn with Gumbel keys from the seed;
- ``stratified``: the paper's vote inside strata. Spherical k-means (``strata`` clusters, seeded) on
  the rows' z-score profiles groups records by which tasks they help; each stratum gets its share of
  the pool's rows as its share of the budget (largest remainders), filled in the vote's order.

All use only the validation-derived scores; none looks at test data.
"""
from __future__ import annotations

import numpy as np

METHODS = ("vote", "mean", "max", "rank", "norm", "merge", "round_robin", "balanced", "resample", "stratified")
#: methods that fill the budget step by step instead of ranking by one number
GREEDY = ("round_robin", "balanced", "resample", "stratified")
TIE_BREAKS = ("mean_rank", "index", "random")


def task_ranks(scores: np.ndarray) -> np.ndarray:
    """(N, K) per-task descending ranks, 0 = best; equal scores share the lowest rank."""
    n, k = scores.shape
    ranks = np.empty((n, k), dtype=np.float64)
    for j in range(k):
        col = scores[:, j]
        # rank = number of strictly larger scores (ties share a rank, independent of row order)
        ranks[:, j] = n - np.searchsorted(np.sort(col), col, side="right")
    return ranks


def thresholds(scores: np.ndarray, percentile: float) -> np.ndarray:
    return np.quantile(scores, percentile / 100.0, axis=0, method="higher")


def votes(scores: np.ndarray, percentile: float = 80) -> np.ndarray:
    return (scores >= thresholds(scores, percentile)[None, :]).sum(axis=1)


def budget(n: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1]")
    return int(ratio * n)


def _check(scores: np.ndarray) -> None:
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (N, K) array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")


def ordering(scores: np.ndarray, method: str = "vote", threshold_percentile: float = 80,
             tie_break: str = "mean_rank", seed: int = 0) -> np.ndarray:
    """All row indices, best first (the ranking methods)."""
    scores = np.asarray(scores, dtype=np.float64)
    _check(scores)
    if method in GREEDY:
        raise ValueError(f"{method!r} fills a budget step by step: use select()")
    if method not in METHODS:
        raise ValueError(f"unknown consensus method {method!r}; choose from {METHODS}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; choose from {TIE_BREAKS}")
    n = scores.shape[0]
    index = np.arange(n)
    if method == "vote":
        primary = -votes(scores, threshold_percentile).astype(np.float64)
    elif method in ("mean", "merge"):
        primary = -scores.mean(axis=1)
    elif method == "max":
        primary = -scores.max(axis=1)
    elif method == "rank":
        primary = task_ranks(scores).mean(axis=1)
    else:  # norm
        primary = -zscores(scores).mean(axis=1)
    if tie_break == "mean_rank":
        secondary = task_ranks(scores).mean(axis=1)
    elif tie_break == "index":
        secondary = np.zeros(n)
    else:
        secondary = np.random.default_rng(seed).permutation(n).astype(np.float64)
    return np.lexsort((index, secondary, primary))  # last key is the primary one


def _task_orders(scores: np.ndarray, threshold_percentile: float) -> list[np.ndarray]:
    """Each task's rows best first: its own score, then votes, then mean per-task rank, then index."""
    v = votes(scores, threshold_percentile).astype(np.float64)
    mean_rank = task_ranks(scores).mean(axis=1)
    index = np.arange(scores.shape[0])
    return [np.lexsort((index, mean_rank, -v, -scores[:, j])) for j in range(scores.shape[1])]


def zscores(scores: np.ndarray) -> np.ndarray:
    """Each task's column minus its mean over its population std (a constant column becomes 0)."""
    std = scores.std(axis=0)
    return (scores - scores.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _take_turns(orders: list[np.ndarray], k: int) -> np.ndarray:
    """``k`` rows: the tasks take turns (in column order), each adding its first row not yet taken."""
    taken = np.zeros(len(orders[0]), dtype=bool)
    cursor = [0] * len(orders)
    out: list[int] = []
    while len(out) < k:
        for j, order in enumerate(orders):
            if len(out) == k:
                break
            while taken[order[cursor[j]]]:
                cursor[j] += 1
            row = int(order[cursor[j]])
            taken[row] = True
            out.append(row)
    return np.asarray(out, dtype=np.int64)


def round_robin(scores: np.ndarray, k: int, threshold_percentile: float = 80) -> np.ndarray:
    """``k`` rows: the tasks take turns (in column order), each adding its best row not yet taken."""
    return _take_turns(_task_orders(scores, threshold_percentile), k)


def resample(scores: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` rows: the tasks take turns, each drawing a row not yet taken with probability
    proportional to ``exp(z)`` of its column. Sorting ``z + Gumbel noise`` descending and skipping
    taken rows is exactly that sequence of draws without replacement (the Gumbel-top-k trick)."""
    keys = zscores(scores) + np.random.default_rng(seed).gumbel(size=scores.shape)
    return _take_turns([np.argsort(-keys[:, j], kind="stable") for j in range(scores.shape[1])], k)


def stratified(scores: np.ndarray, k: int, threshold_percentile: float = 80, tie_break: str = "mean_rank",
               seed: int = 0, strata: int = 20) -> np.ndarray:
    """``k`` rows: strata of the rows' z-score profile directions (seeded spherical k-means), each
    given ``k * size / N`` rows (largest remainders, ties to the lower stratum), filled in the
    vote's order (:func:`ordering`)."""
    from .geometry import kmeans, unit_rows  # torch, which only this consensus needs

    labels = kmeans(unit_rows(zscores(scores)), strata, seed)[0].numpy()
    sizes = np.bincount(labels)
    exact = k * sizes / len(labels)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[:k - quota.sum()]] += 1
    out: list[int] = []
    for row in ordering(scores, "vote", threshold_percentile, tie_break, seed):
        if quota[labels[row]] > 0:
            quota[labels[row]] -= 1
            out.append(int(row))
    return np.asarray(out, dtype=np.int64)


def balanced(scores: np.ndarray, k: int, threshold_percentile: float = 80) -> np.ndarray:
    """``k`` rows: per-task z-scores; each step, the task whose selected rows have the lowest summed
    z-score (first such task on ties) adds its best row not yet taken."""
    z = zscores(scores)
    orders = _task_orders(scores, threshold_percentile)
    taken = np.zeros(scores.shape[0], dtype=bool)
    cursor = [0] * len(orders)
    total = np.zeros(scores.shape[1])
    out: list[int] = []
    while len(out) < k:
        j = int(np.argmin(total))
        while taken[orders[j][cursor[j]]]:
            cursor[j] += 1
        row = int(orders[j][cursor[j]])
        taken[row] = True
        out.append(row)
        total += z[row]
    return np.asarray(out, dtype=np.int64)


def select(scores, ratio: float, method: str = "vote", threshold_percentile: float = 80,
           tie_break: str = "mean_rank", seed: int = 0, strata: int = 20) -> np.ndarray:
    """Exactly ``int(ratio * N)`` selected row indices of the (N, K) ``scores``, sorted ascending."""
    scores = np.asarray(scores, dtype=np.float64)
    return select_k(scores, budget(scores.shape[0], ratio), method, threshold_percentile, tie_break, seed, strata)


def select_k(scores, k: int, method: str = "vote", threshold_percentile: float = 80,
             tie_break: str = "mean_rank", seed: int = 0, strata: int = 20) -> np.ndarray:
    """:func:`select` for a budget of ``k`` rows."""
    scores = np.asarray(scores, dtype=np.float64)
    if method in GREEDY:
        _check(scores)
        if method == "round_robin":
            rows = round_robin(scores, k, threshold_percentile)
        elif method == "balanced":
            rows = balanced(scores, k, threshold_percentile)
        elif method == "resample":
            rows = resample(scores, k, seed)
        else:
            rows = stratified(scores, k, threshold_percentile, tie_break, seed, strata)
        return np.sort(rows)
    order = ordering(scores, method, threshold_percentile, tie_break, seed)
    return np.sort(order[:k])
