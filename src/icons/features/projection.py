"""Random projections of gradient features, seeded and identical for pool and validation sets.

- ``none``: the exact gradient (dimension D);
- ``rademacher``: x -> x R / sqrt(d) with R a D x d matrix of random +-1, generated block by
  block from the seed (never held as one dense float matrix; cached as int8 when small).
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 4096


class Projection:
    kind = "none"

    def __init__(self, in_dim: int, dim: int | None = None, seed: int = 0):
        self.in_dim, self.seed = in_dim, seed
        self.dim = in_dim if dim is None else dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def meta(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "in_dim": self.in_dim}


class Rademacher(Projection):
    kind = "rademacher"
    CACHE_LIMIT = 1 << 28  # cache the +-1 blocks as int8 up to 256 MiB

    def __init__(self, in_dim: int, dim: int, seed: int = 0):
        super().__init__(in_dim, dim, seed)
        self._cache: list[torch.Tensor] | None = [] if in_dim * dim <= self.CACHE_LIMIT else None

    def _block(self, b: int) -> torch.Tensor:
        if self._cache is not None and b < len(self._cache):
            return self._cache[b]
        rows = min(BLOCK_ROWS, self.in_dim - b * BLOCK_ROWS)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        blk = (torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8) * 2 - 1)
        if self._cache is not None:
            self._cache.append(blk)
        return blk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32)
        for b in range((self.in_dim + BLOCK_ROWS - 1) // BLOCK_ROWS):
            sl = slice(b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, self.in_dim))
            out += x[:, sl].float() @ self._block(b).float()
        return out / self.dim ** 0.5


def make_projection(kind: str, in_dim: int, dim: int, seed: int) -> Projection:
    if kind == "none":
        return Projection(in_dim)
    if kind == "rademacher":
        return Rademacher(in_dim, dim, seed)
    raise ValueError(f"unknown projection {kind!r}")
