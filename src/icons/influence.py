"""Step 3 of ICONS, the specialist: per-task influence scores from gradient features.

``s_k(z) = mean over z' in val_k of cos(G(z), g(z'))`` equals ``<G(z)/|G(z)|, mean_z' g(z')/|g(z')|>``,
so each task (or sub-task) needs one mean vector and the N x |val| matrix never exists.
Several warmup checkpoints combine as ``sum_c w_c s_c`` with ``w_c`` their normalised average
learning rates (LESS); a task with sub-tasks (the MME analog) takes the max over its sub-tasks.
"""
from __future__ import annotations

import numpy as np
import torch

MERGE = "__merge__"


def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def adam_precondition(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float,
                      eps: float) -> torch.Tensor:
    """LESS's Adam direction for one step from the checkpoint's (read-only) moments."""
    m1 = beta1 * m + (1 - beta1) * g
    v1 = beta2 * v + (1 - beta2) * g * g
    return m1 / (v1.sqrt() + eps)


def group_of(record: dict) -> str:
    """Validation group of a record: its task, or ``task/subtask`` for tasks with sub-tasks."""
    return f"{record['task']}/{record['subtask']}" if record.get("subtask") else record["task"]


def group_means(normed: torch.Tensor, labels: list[str], groups: list[str]) -> torch.Tensor:
    """(G, d) mean of the normalised validation vectors of each group."""
    out = torch.zeros(len(groups), normed.shape[1], dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.float64)
    index = {g: i for i, g in enumerate(groups)}
    for row, lab in zip(normed, labels):
        for g in (lab, MERGE):
            if g in index:
                out[index[g]] += row.double()
                counts[index[g]] += 1
    if (counts == 0).any():
        empty = [g for g, c in zip(groups, counts) if c == 0]
        raise ValueError(f"validation groups without examples: {empty}")
    return (out / counts[:, None]).float()


def combine_checkpoints(per_ckpt: list[np.ndarray], avg_lrs: list[float]) -> np.ndarray:
    w = np.asarray(avg_lrs, dtype=np.float64)
    w = w / w.sum()
    return sum(wc * s.astype(np.float64) for wc, s in zip(w, per_ckpt))


def task_table(group_scores: np.ndarray, groups: list[str], tasks: list[str]) -> np.ndarray:
    """(N, G) group scores -> (N, K) task scores (sub-tasks: max)."""
    cols = []
    for t in tasks:
        idx = [i for i, g in enumerate(groups) if g == t or g.startswith(t + "/")]
        if not idx:
            raise ValueError(f"no validation scores for task {t!r}")
        cols.append(group_scores[:, idx].max(axis=1))
    return np.stack(cols, axis=1)


def direct_scores(pool: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Reference for tests: the N x V cosine matrix, averaged over V."""
    p = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    v = val / np.linalg.norm(val, axis=1, keepdims=True)
    return (p @ v.T).mean(axis=1)
