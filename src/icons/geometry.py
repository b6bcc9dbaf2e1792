"""Embedding geometry the baseline selectors share: unit rows, seeded spherical k-means and the
k-nearest-neighbour graph, computed in row chunks so that a pool of 665K rows never needs an
N x N matrix (torch on CPU here; pass ``device`` to use a GPU)."""
from __future__ import annotations

import numpy as np
import torch


def unit_rows(x: np.ndarray) -> torch.Tensor:
    """float32 rows scaled to unit length (a zero row stays zero)."""
    t = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: stores are read-only memory maps
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25, chunk: int = 8192,
           device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(labels N, centroids k x D) of spherical k-means on unit rows ``x`` (cosine similarity;
    k-means++ seeding from a seeded generator, Lloyd iterations until no label changes). An empty
    cluster is re-seeded with the row farthest from its centroid."""
    n = len(x)
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    x = x.to(device)
    centres = x[torch.randint(n, (1,), generator=gen).item()][None].clone()
    best = (x @ centres.T)[:, 0]
    for _ in range(1, k):  # k-means++ on cosine distance 1 - sim
        d = (1 - best).clamp_min(0).cpu().double()
        if d.sum() > 0:
            pick = torch.multinomial(d / d.sum(), 1, generator=gen).item()
        else:  # every row is already a centre's copy
            pick = int(torch.randint(n, (1,), generator=gen))
        centres = torch.cat([centres, x[pick][None]])
        best = torch.maximum(best, x @ x[pick])
    labels = None
    for _ in range(iters):
        sim, new = _nearest(x, centres, chunk)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        for c in torch.nonzero(counts == 0)[:, 0].tolist():
            far = int(torch.argmin(sim))
            sums[c], sim[far] = x[far], 2.0
        centres = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return labels.cpu(), centres.cpu()


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, labels = [], []
    for s in range(0, len(x), chunk):
        v, i = (x[s:s + chunk] @ centres.T).max(1)
        sims.append(v)
        labels.append(i)
    return torch.cat(sims), torch.cat(labels)


def knn(x: torch.Tensor, k: int, chunk: int = 4096,
        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbours N x k, cosine similarities N x k, most similar first) of each unit row, itself
    excluded."""
    k = min(k, len(x) - 1)
    x = x.to(device)
    idx, sims = [], []
    for s in range(0, len(x), chunk):
        sim = x[s:s + chunk] @ x.T
        rows = torch.arange(s, min(s + chunk, len(x)), device=device)
        sim[torch.arange(len(rows)), rows] = -float("inf")
        v, i = torch.topk(sim, k, dim=1, sorted=True)
        idx.append(i.cpu())
        sims.append(v.cpu())
    return torch.cat(idx), torch.cat(sims)
