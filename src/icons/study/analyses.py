"""The paper's analyses as plain computations over selections and task scores (numpy only).

- :func:`top_masks`: each task's own top share of the pool (its specialist selection);
- :func:`overlap_matrix`: ``|A ∩ B| / |A|`` between selections of equal size (the paper's heat maps);
- :func:`pair_correlations`: the task score columns' Pearson correlations, pair by pair;
- :func:`seed_summary`: mean and spread of a metric over seeds.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np


def top_rows(column: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best rows of one score column (ties to the lower row), ascending."""
    order = np.lexsort((np.arange(len(column)), -np.asarray(column, dtype=np.float64)))
    return np.sort(order[:k])


def top_masks(scores: np.ndarray, ratio: float) -> np.ndarray:
    """(K, N) boolean: task k's own top ``int(ratio * N)`` rows."""
    n, k_tasks = scores.shape
    k = int(ratio * n)
    masks = np.zeros((k_tasks, n), dtype=bool)
    for j in range(k_tasks):
        masks[j, top_rows(scores[:, j], k)] = True
    return masks


def overlap(a, b) -> float:
    """Share of selection ``a`` that is also in ``b`` (percent); for equal sizes it is symmetric."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return 100.0 * len(a & b) / len(a) if a else float("nan")


def mask_overlaps(masks: np.ndarray) -> np.ndarray:
    """(K, K) with ``M[i, j]`` = percent of task i's top set that is also in task j's."""
    return np.array([[100.0 * (a & b).sum() / a.sum() for b in masks] for a in masks])


def overlap_matrix(selections: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(names, M) with ``M[i, j] = overlap(selection_i, selection_j)``."""
    names = list(selections)
    m = np.array([[overlap(selections[a], selections[b]) for b in names] for a in names])
    return names, m


def pair_correlations(scores: np.ndarray, tasks: list[str]) -> dict[tuple[str, str], float]:
    """Pearson correlation of every pair of task score columns."""
    c = np.corrcoef(np.asarray(scores, dtype=np.float64), rowvar=False)
    return {(tasks[i], tasks[j]): float(c[i, j]) for i, j in combinations(range(len(tasks)), 2)}


def upper(m: np.ndarray) -> np.ndarray:
    """The entries above the diagonal, row by row (the pairs of a symmetric matrix)."""
    i, j = np.triu_indices(m.shape[0], 1)
    return m[i, j]


def seed_summary(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds (NaN values, a
    relative performance with no task to divide by, left out of them; kept in ``values``)."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0,
                "values": list(values)}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": len(v), "values": list(values)}
