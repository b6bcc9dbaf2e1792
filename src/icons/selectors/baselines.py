"""The baseline selectors as plain functions: per-example values in, ``k`` pool rows out (sorted).

Each follows its paper's definition; where a paper leaves a choice open, the docstring says which
one is taken here. Every function is deterministic given its inputs (and ``seed`` where there is
one), and returns exactly ``k`` distinct rows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import kmeans, knn, unit_rows

BANDS = ("low", "middle", "high")


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows of highest score (NaN last, ties by index), sorted."""
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(len(s)), -s))
    return np.sort(order[:k]).astype(np.int64)


def by_length(answer_tokens: np.ndarray, k: int) -> np.ndarray:
    """Longest responses first (Zhao et al. 2024, "Long Is More for Alignment": the instructions
    with the longest responses). Length is the number of answer tokens under the model's tokenizer
    (every assistant turn of the record, its ``</s>`` included); ties by pool order."""
    return _top(answer_tokens, k)


def band(score: np.ndarray, k: int, which: str) -> np.ndarray:
    """``k`` rows from the ``low``, ``middle`` or ``high`` end of ``score`` (ascending; NaN rows never
    in the middle or low band, ties by pool order). ``middle``: the ``k`` rows centred on the median,
    positions ``[n//2 - k//2, n//2 - k//2 + k)`` of the ascending order, as COINCIDE's released
    training code cuts its perplexity and EL2N baselines."""
    if which not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {which!r}")
    s = np.asarray(score, dtype=np.float64)
    finite = ~np.isnan(s)
    order = np.lexsort((np.arange(len(s)), np.where(finite, s, np.inf)))
    m = int(finite.sum())
    if which == "high":
        return _top(s, k)
    start = 0 if which == "low" or m <= k else min(m - k, max(0, m // 2 - k // 2))
    return np.sort(order[start:start + k]).astype(np.int64)


def semdedup(embed: np.ndarray, k: int, clusters: int, seed: int) -> np.ndarray:
    """SemDeDup (Abbas et al. 2023): spherical k-means on the embeddings; inside each cluster the
    records are ordered farthest from the centroid first (upstream's ``keep_hard``) and each one's
    duplicate score is its largest cosine similarity to a record before it in that order (the first
    has none: -1); a record is removed when that exceeds ``1 - eps``. Instead of a hand-set ``eps``,
    the ``k`` records of lowest duplicate score are kept: exactly the set some ``eps`` keeps, so the
    budget is met exactly (ties by pool order). Of a group of exact duplicates one is kept until
    the budget needs more."""
    x = unit_rows(embed)
    labels, centres = kmeans(x, clusters, seed)
    dup = np.full(len(x), -1.0)
    for c in range(len(centres)):
        members = torch.nonzero(labels == c)[:, 0]
        if len(members) < 2:
            continue
        far_first = members[torch.argsort(-(1 - x[members] @ centres[c]), stable=True)]
        sim = x[far_first] @ x[far_first].T
        earlier = torch.triu(sim, diagonal=1)  # (i, j): i before j
        earlier[torch.tril(torch.ones_like(sim, dtype=torch.bool))] = -1.0
        dup[far_first.numpy()] = earlier.max(0).values.double().numpy()
    return _top(-dup, k)


def d2_pruning(embed: np.ndarray, difficulty: np.ndarray, k: int, neighbours: int = 5,
               gamma_forward: float = 1.0, gamma_reverse: float = 0.4) -> np.ndarray:
    """D2 Pruning (Maharana et al. 2024): a k-nearest-neighbour graph of the embeddings (Euclidean
    distance ``d`` of unit rows, so the gammas mean the same at every model width); forward message
    passing gives each node ``s_i + sum_{j in N(i)} exp(-gamma_forward * d_ij) * s_j`` from its
    difficulty ``s`` (EL2N); then greedy selection of the highest node, after each pick its
    neighbours lowered by ``exp(-gamma_reverse * d_ij) * s_picked`` (reverse message passing).
    Defaults: 5 neighbours, forward gamma 1 and reverse gamma 0.4, as COINCIDE runs it on LLaVA-665K;
    no hard-example pre-pruning (its beta), as there."""
    x = unit_rows(embed)
    nbr, sim = knn(x, neighbours)
    d = (2 - 2 * sim).clamp_min(0).sqrt().double()
    s = torch.as_tensor(np.nan_to_num(np.asarray(difficulty, dtype=np.float64), nan=0.0))
    score = s + (torch.exp(-gamma_forward * d) * s[nbr]).sum(1)
    # the graph is symmetric: a pick lowers its neighbours and the nodes that have it as a neighbour
    # (an edge found from both ends counts once)
    src = torch.arange(len(x)).repeat_interleave(nbr.shape[1])
    pair = torch.cat([src * len(x) + nbr.reshape(-1), nbr.reshape(-1) * len(x) + src])
    pair, first = np.unique(pair.numpy(), return_index=True)
    dist = torch.cat([d.reshape(-1), d.reshape(-1)])[torch.as_tensor(first)]
    edges = torch.as_tensor(np.stack([pair // len(x), pair % len(x)], 1))  # sorted by source node
    start = torch.searchsorted(edges[:, 0].contiguous(), torch.arange(len(x) + 1))
    score = score.numpy().copy()
    taken = np.zeros(len(x), dtype=bool)
    out = []
    for _ in range(k):
        i = int(np.argmax(np.where(taken, -np.inf, score)))  # ties: the lowest row
        out.append(i)
        taken[i] = True
        a, b = int(start[i]), int(start[i + 1])
        js, dij = edges[a:b, 1].numpy(), dist[a:b].numpy()
        np.subtract.at(score, js, np.exp(-gamma_reverse * dij) * score[i])
    return np.sort(np.asarray(out, dtype=np.int64))


def _kernel(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma ** 2))


def mmd_prototypes(x: torch.Tensor, m: int, sigma: float) -> list[int]:
    """``m`` rows of ``x`` chosen greedily to minimise the squared MMD between them and all of
    ``x`` under a Gaussian kernel (MMD-critic's prototypes; ties by index)."""
    kxx = _kernel(x, x, sigma).double()
    col_mean = kxx.mean(0)
    chosen: list[int] = []
    ksum = torch.zeros(len(x), dtype=torch.float64)  # sum over chosen of k(c, j)
    self_sum = 0.0
    for t in range(1, m + 1):
        # MMD^2(S + j) up to a constant: (self_sum + 2 ksum_j + k_jj) / t^2 - 2 (sum col_mean_S + col_mean_j) / t
        gain = (self_sum + 2 * ksum + kxx.diagonal()) / t ** 2 - 2 * (col_mean[chosen].sum() + col_mean) / t
        gain[chosen] = float("inf")
        j = int(torch.argmin(gain))
        self_sum += float(2 * ksum[j] + kxx[j, j])
        ksum += kxx[j]
        chosen.append(j)
    return chosen


def coincide(features: np.ndarray, k: int, clusters: int, seed: int, tau: float = 0.1, sigma: float = 1.0,
             text_parts: np.ndarray | None = None) -> np.ndarray:
    """COINCIDE (Lee et al. 2024): spherical k-means on the multi-layer concept-skill features;
    per cluster, transferability ``T`` (mean cosine of its centroid to the other centroids, pairs
    above 0.9 left out, on the text parts of the centroids when ``text_parts`` marks them) and
    density ``D`` (mean Gaussian kernel ``exp(-|x - y|^2 / (2 sigma^2))`` over the cluster's pairs,
    itself included); clusters drawn on ``P = softmax(T / D / tau)``: visited by decreasing ``P``,
    each takes ``round(remaining * P_i)`` records (at most its size; what it cannot take passes to
    the rest, ``P`` renormalised over them), and inside a cluster the records that best keep its
    distribution (greedy MMD prototypes). Defaults ``tau=0.1``, ``sigma=1``, as its released scripts."""
    x = unit_rows(features)
    labels, centres = kmeans(x, clusters, seed)
    members = [torch.nonzero(labels == c)[:, 0] for c in range(len(centres))]
    cent = centres if text_parts is None else centres[:, torch.as_tensor(text_parts)]
    cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = cent @ cent.T
    keep = sim <= 0.9
    transfer = torch.where(keep, sim, torch.zeros_like(sim)).sum(1) / keep.sum(1).clamp_min(1)
    density = torch.stack([_kernel(x[m], x[m], sigma).mean() if len(m) else torch.tensor(1.0) for m in members])
    p = torch.softmax((transfer / density).double() / tau, 0)
    p[torch.tensor([len(m) == 0 for m in members])] = 0.0
    order = sorted(range(len(centres)), key=lambda c: (-float(p[c]), c))
    remaining, mass, out = k, float(p.sum()), []
    for c in order:
        if remaining <= 0:
            break
        share = float(p[c]) / mass if mass > 0 else 0.0
        take = min(len(members[c]), remaining, max(0, round(remaining * share)))
        mass -= float(p[c])
        if c == order[-1] or mass <= 0:
            take = min(len(members[c]), remaining)
        if take:
            out += members[c][mmd_prototypes(x[members[c]], take, sigma)].tolist()
            remaining -= take
    if remaining > 0:  # rounding left some budget: the next records of the most probable clusters
        taken = set(out)
        out += [i for c in order for i in members[c].tolist() if i not in taken][:remaining]
    return np.sort(np.asarray(out, dtype=np.int64))


def rds_table(pool_embed: np.ndarray, val_embed: np.ndarray, val_tasks: list[str], tasks: list[str]) -> np.ndarray:
    """RDS+ (Ivison et al. 2025) per-task scores (N x K): cosine of each pool record's
    position-weighted mean-pooled last hidden state with each validation record's, the max over
    a task's validation records (its released code's ``max`` aggregation)."""
    pool, val = unit_rows(pool_embed), unit_rows(val_embed)
    table = np.zeros((len(pool), len(tasks)), dtype=np.float64)
    for j, task in enumerate(tasks):
        rows = [i for i, t in enumerate(val_tasks) if t == task]
        if not rows:
            raise ValueError(f"rds: task {task!r} has no validation records")
        for s in range(0, len(pool), 8192):
            table[s:s + 8192, j] = (pool[s:s + 8192] @ val[rows].T).max(1).values.double().numpy()
    return table


def clip_score(scores: np.ndarray, k: int) -> np.ndarray:
    """CLIP-Score: the ``k`` records whose image and text agree most (cosine of CLIP's image and
    text embeddings); records without an image (NaN) last."""
    return _top(scores, k)
