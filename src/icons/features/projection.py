"""Random projections of gradient features, seeded and identical for pool and validation sets.

- ``none``: the exact gradient (dimension D);
- ``rademacher``: x -> x R / sqrt(d) with R a D x d matrix of random +-1, generated block by
  block from the seed (blocks cached as float32 while R fits in 1 GiB, as int8 while it fits in
  256 MiB, regenerated per use beyond that); the projection of a concatenation is the sum of
  each part's product with its own rows of R, so ``project_blocks`` accumulates it matrix by
  matrix;
- ``kronecker``: a sum over LoRA weight matrices of independent two-sided sketches,
  ``y = sum_m vec(L_m G_m R_m^T)`` with ``G_m`` the (out, in) gradient of matrix m. Each
  ``L_m G_m R_m^T`` is ``a_m x b_m`` with ``a_m * b_m = dim``, so every matrix lands in the same
  ``dim``-vector (summed, never concatenated). Factors are seeded per matrix from
  ``(seed, parameter name)``, so pool and validation sets (and separate processes) get the same map.

Kronecker factor mapping, per matrix of shape (out, in) with short side ``s = min(out, in)``
(for LoRA: the rank r):
- ``dim % s == 0`` (the recommended case: choose ``dim`` a multiple of the LoRA rank): the short
  side is kept whole, only mixed by a random signed permutation (orthogonal: adds no variance,
  makes the sketch's covariance isotropic so different matrices do not interfere more than
  in a dense projection); the long side gets a Gaussian factor with ``dim / s`` rows.
  ``lora_A`` (r, in): ``y = S G R^T``, R (dim/r x in); ``lora_B`` (out, r): ``y = L G S^T``, L (dim/r x out).
- otherwise: Gaussian factors on both sides, ``a * b = dim`` the most balanced divisor pair
  (the larger factor on the longer side). Valid, but noisier (extra ~2/b relative variance).
Gaussian entries have variance ``1 / rows`` (``E[L^T L] = I``), so ``E[<Px, Py>] = <x, y>``.
Cost per example: ~``2 * (dim / r) * P`` multiply-adds for P LoRA weights (dense: ``2 * dim * P``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import torch

BLOCK_ROWS = 4096


class Projection:
    kind = "none"

    def __init__(self, in_dim: int, dim: int | None = None, seed: int = 0):
        self.in_dim, self.seed = in_dim, seed
        self.dim = in_dim if dim is None else dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def project_blocks(self, blocks: Iterable[torch.Tensor]) -> torch.Tensor:
        """Per-matrix gradients (B, out, in), in the order of the flat gradient -> (B, dim), equal
        to ``self(torch.cat([g.flatten(1) for g in blocks], 1))``. The identity has to form the
        concatenation; the random projections accumulate matrix by matrix instead."""
        x = torch.cat([g.flatten(1) for g in blocks], dim=1)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"{self.kind}: blocks cover {x.shape[1]} gradient entries, expected {self.in_dim}")
        return self(x)

    def meta(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "in_dim": self.in_dim}


class Rademacher(Projection):
    kind = "rademacher"
    CACHE_LIMIT = 1 << 28  # cache the +-1 blocks as int8 up to 256 MiB
    FLOAT_CACHE_LIMIT = 1 << 30  # ... and as float32 (no conversion per use) up to 1 GiB

    #: beyond this many entries the map is regenerated on the CPU for every batch: hours per batch
    #: at LLaVA-7B scale (3.2e8 x 5120 = 1.6e12), so it is refused with a pointer to kronecker
    MAX_ENTRIES = 1 << 36

    def __init__(self, in_dim: int, dim: int, seed: int = 0):
        super().__init__(in_dim, dim, seed)
        if in_dim * dim > self.MAX_ENTRIES:
            raise ValueError(f"projection=rademacher: a {in_dim} x {dim} dense map ({in_dim * dim:.2e} signs) would be "
                             f"regenerated for every batch; use projection=kronecker (dim a multiple of the LoRA "
                             f"rank) or a smaller projection.dim")
        self._float = in_dim * dim * 4 <= self.FLOAT_CACHE_LIMIT
        small = in_dim * dim <= self.CACHE_LIMIT and not self._float
        self._cache: dict[int, torch.Tensor] | None = {} if small else None
        self._on: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _matrix(self, b: int, device: torch.device) -> torch.Tensor:
        """Block b as float32 on ``device``: cached there when the whole map fits the float cache."""
        if not self._float:
            return self._block_memo(b).to(device).float()
        key = (b, device)
        if key not in self._on:
            self._on[key] = self._block(b).to(device).float()
        return self._on[key]

    def _block(self, b: int) -> torch.Tensor:
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        rows = min(BLOCK_ROWS, self.in_dim - b * BLOCK_ROWS)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        blk = (torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8) * 2 - 1)
        if self._cache is not None:
            self._cache[b] = blk
        return blk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        for b in range((self.in_dim + BLOCK_ROWS - 1) // BLOCK_ROWS):
            sl = slice(b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, self.in_dim))
            out += x[:, sl].float() @ self._matrix(b, x.device)
        return out / self.dim ** 0.5

    def accumulate(self, out: torch.Tensor, x: torch.Tensor, offset: int) -> torch.Tensor:
        """``out += x R[offset:offset + x.shape[1]] / sqrt(dim)``: the share of coordinates
        ``offset ...`` of the flat gradient in its projection (which is the sum of such shares)."""
        end = offset + x.shape[1]
        if offset < 0 or end > self.in_dim:
            raise ValueError(f"rademacher: coordinates {offset}:{end} outside the gradient's {self.in_dim}")
        scale = self.dim ** -0.5
        pos = offset
        while pos < end:
            b = pos // BLOCK_ROWS
            lo = pos - b * BLOCK_ROWS
            hi = min(end, (b + 1) * BLOCK_ROWS) - b * BLOCK_ROWS
            blk = self._matrix(b, x.device)
            out.addmm_(x[:, pos - offset:pos - offset + hi - lo].float(), blk[lo:hi], alpha=scale)
            pos += hi - lo
        return out

    def _block_memo(self, b: int) -> torch.Tensor:
        # uncached (large) maps: a block shared by two adjacent matrices is generated once, not twice
        if self._cache is not None:
            return self._block(b)
        if getattr(self, "_memo", (None,))[0] != b:
            self._memo = (b, self._block(b))
        return self._memo[1]

    def project_blocks(self, blocks: Iterable[torch.Tensor]) -> torch.Tensor:
        """Per-matrix gradients (B, out, in) in flat order -> (B, dim), accumulated matrix by
        matrix (each matrix meets only its own rows of R): equal, up to rounding, to projecting
        the concatenation, which is never formed."""
        out, off = None, 0
        for g in blocks:
            x = g.reshape(g.shape[0], -1)
            if out is None:
                out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
            self.accumulate(out, x, off)
            off += x.shape[1]
        if off != self.in_dim:
            raise ValueError(f"rademacher: blocks cover {off} gradient entries, expected {self.in_dim}")
        return out


def kronecker_plan(out: int, inp: int, dim: int) -> tuple[str, int, int]:
    """How one (out, in) matrix is sketched to ``dim`` numbers: (mode, a, b), output a x b.

    mode ``rows``: rows kept (signed permutation), R Gaussian (b x in);
    ``cols``: columns kept, L Gaussian (a x out); ``both``: L (a x out) and R (b x in) Gaussian.
    """
    s = min(out, inp)
    if dim % s == 0:
        return ("rows", out, dim // out) if out <= inp else ("cols", dim // inp, inp)
    small = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    big = dim // small
    return ("both", big, small) if out >= inp else ("both", small, big)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"icons-kronecker/{seed}/{name}".encode()).digest()[:8], "little") >> 1


class Kronecker(Projection):
    """Sum over matrices of ``vec(L_m G_m R_m^T)`` (see the module docstring for the mapping).

    ``layout``: ``[(name, (out, in)), ...]`` in the order of the flat gradient (the order of
    ``PerExampleGrads.names``). ``__call__`` takes the flat (B, D) gradient and works on per-matrix
    views of it; ``project_blocks`` takes the per-matrix (B, out, in) gradients directly, so a
    caller that has them never needs to form the flat whole-model gradient.
    """

    kind = "kronecker"

    def __init__(self, layout: Sequence[tuple[str, Sequence[int]]], dim: int, seed: int = 0):
        self.layout = [(str(n), (int(s[0]), int(s[1]))) for n, s in layout]
        if not self.layout:
            raise ValueError("kronecker projection needs at least one matrix")
        if len({n for n, _ in self.layout}) != len(self.layout):
            raise ValueError("kronecker projection: matrix names must be unique")
        super().__init__(sum(o * i for _, (o, i) in self.layout), dim, seed)
        self.plans = [kronecker_plan(o, i, dim) for _, (o, i) in self.layout]
        self._factors: dict[tuple[int, torch.device], tuple] = {}

    def factors(self, m: int, device: torch.device | str = "cpu") -> tuple:
        """(mode, left, right) of matrix m: Gaussian factors as float32 tensors, kept sides as
        (perm, signs). Generated on the CPU from the seed (device independent), then cached."""
        device = torch.device(device)
        key = (m, device)
        if key not in self._factors:
            name, (o, i) = self.layout[m]
            mode, a, b = self.plans[m]
            g = torch.Generator().manual_seed(_seed_of(self.seed, name))

            def gauss(rows, cols):
                return (torch.randn(rows, cols, generator=g) / math.sqrt(rows)).to(device)

            def signed_perm(n):
                perm = torch.randperm(n, generator=g)
                signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
                return perm.to(device), signs.to(device)

            if mode == "rows":
                left, right = signed_perm(o), gauss(b, i)
            elif mode == "cols":
                left, right = gauss(a, o), signed_perm(i)
            else:
                left, right = gauss(a, o), gauss(b, i)
            self._factors[key] = (mode, left, right)
        return self._factors[key]

    def project_layer(self, m: int, g: torch.Tensor) -> torch.Tensor:
        """(B, out, in) gradients of matrix m -> (B, dim) sketches (before the sum over matrices)."""
        name, (o, i) = self.layout[m]
        if g.shape[1:] != (o, i):
            raise ValueError(f"kronecker: {name} expects (B, {o}, {i}) gradients, got {tuple(g.shape)}")
        mode, left, right = self.factors(m, g.device)
        g = g.float()
        n = g.shape[0]
        # Explicit bmm with the factor broadcast over the batch: one (out, in) product per example,
        # so an example's sketch does not depend on the batch it is in (torch's folded 2-D @ 3-D
        # matmul picks kernels by the folded size, which changes the rounding with the batch size).
        if mode == "rows":  # S (G R^T): rows permuted and signed after the product
            perm, signs = left
            y = torch.bmm(g, right.T.expand(n, -1, -1)).index_select(1, perm) * signs[:, None]
        elif mode == "cols":  # (L G) S^T
            perm, signs = right
            y = torch.bmm(left.expand(n, -1, -1), g).index_select(2, perm) * signs
        else:
            a, b = left.shape[0], right.shape[0]
            lt, rt = left.expand(n, -1, -1), right.T.expand(n, -1, -1)
            if a * i * (o + b) <= b * o * (i + a):
                y = torch.bmm(torch.bmm(lt, g), rt)
            else:
                y = torch.bmm(lt, torch.bmm(g, rt))
        return y.reshape(n, self.dim)

    def project_blocks(self, blocks: Iterable[torch.Tensor]) -> torch.Tensor:
        """Per-matrix gradients (B, out, in), in layout order -> (B, dim)."""
        out = None
        n = 0
        for m, g in enumerate(blocks):
            if m >= len(self.layout):
                raise ValueError(f"kronecker: more gradient blocks than the {len(self.layout)} matrices of the layout")
            y = self.project_layer(m, g)
            out = y if out is None else out.add_(y)
            n += 1
        if n != len(self.layout):
            raise ValueError(f"kronecker: got {n} gradient blocks, the layout has {len(self.layout)}")
        return out

    def blocks(self, x: torch.Tensor) -> Iterable[torch.Tensor]:
        """Views (B, out, in) of a flat (B, D) gradient, one per matrix (no copies)."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"kronecker: expected (B, {self.in_dim}) gradients, got {tuple(x.shape)}")
        off = 0
        for _, (o, i) in self.layout:
            yield x[:, off:off + o * i].unflatten(1, (o, i))
            off += o * i

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_blocks(self.blocks(x))

    def layout_sha1(self) -> str:
        return hashlib.sha1(repr(self.layout).encode()).hexdigest()[:16]

    def meta(self) -> dict:
        modes = [p[0] for p in self.plans]
        return {**super().meta(), "factors": "gaussian+signed_permutation", "n_matrices": len(self.layout),
                "layout_sha1": self.layout_sha1(),
                "plans": {k: modes.count(k) for k in ("rows", "cols", "both") if k in modes}}


PROJECTION_KINDS = ("none", "rademacher", "kronecker")


def make_projection(kind: str, in_dim: int, dim: int, seed: int,
                    layout: Sequence[tuple[str, Sequence[int]]] | None = None) -> Projection:
    """``layout`` (``[(name, (out, in)), ...]`` of the LoRA weight matrices) is needed by ``kronecker``."""
    if kind == "none":
        return Projection(in_dim)
    if kind == "rademacher":
        return Rademacher(in_dim, dim, seed)
    if kind == "kronecker":
        if layout is None:
            raise ValueError("projection=kronecker needs the layout of the LoRA weight matrices")
        proj = Kronecker(layout, dim, seed)
        if proj.in_dim != in_dim:
            raise ValueError(f"kronecker layout covers {proj.in_dim} gradient entries, expected {in_dim}")
        return proj
    raise ValueError(f"unknown projection {kind!r}")
