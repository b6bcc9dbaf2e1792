"""Projections (rademacher, kronecker), their metadata checks, and streamed scoring.

Tolerances of the inner-product tests are the estimators' exact standard deviations, computed
from the projection's dimensions (``dim`` and the per-matrix factor sizes it implies) and the test
vectors; nothing is tuned to the seeds used.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from icons.features.projection import Kronecker, Rademacher, kronecker_plan, make_projection
from icons.influence import check_compatible, stream_scores

from .tiny_lora import tiny_lora_model

# LoRA-shaped layout (r = 4) plus one odd matrix whose short side does not divide dim ("both" mode)
LAYOUT = [("l0.q.lora_A", (4, 96)), ("l0.q.lora_B", (96, 4)), ("l0.up.lora_A", (4, 96)), ("l0.up.lora_B", (160, 4)),
          ("l0.down.lora_A", (4, 160)), ("l0.down.lora_B", (96, 4)), ("extra", (6, 10))]


# ---------------------------------------------------------------- exact variances of the estimators
def kronecker_variance(proj: Kronecker, gs: list[np.ndarray], hs: list[np.ndarray]) -> float:
    """Var of <P g, P h> for the sum-of-Kronecker sketch (Gaussian factors with variance 1/rows,
    signed permutations on kept sides; independent across matrices).

    Per matrix, with N = H^T G, M = G H^T, P = H^T H, Q = G^T G:
      rows kept (R: b x in):   (|N|^2 + tr N^2) / b
      cols kept (L: a x out):  (|M|^2 + tr M^2) / a
      both Gaussian:           (1/a)[tr PQ + (tr PQ + tr P tr Q)/b + tr N^2 + (|N|^2 + (tr N)^2)/b] + (|N|^2 + tr N^2)/b
    Across matrices m != m' (each sketch has isotropic covariance |G_m|^2 / dim):
      sum_{m != m'} (|G_m|^2 |H_m'|^2 + <G_m, H_m><G_m', H_m'>) / dim
    """
    tot = 0.0
    for (mode, a, b), g, h in zip(proj.plans, gs, hs):
        n = h.T @ g
        if mode == "rows":
            tot += ((n ** 2).sum() + np.trace(n @ n)) / b
        elif mode == "cols":
            m = g @ h.T
            tot += ((m ** 2).sum() + np.trace(m @ m)) / a
        else:
            p, q = h.T @ h, g.T @ g
            tr_pq = np.trace(p @ q)
            tot += (tr_pq + (tr_pq + np.trace(p) * np.trace(q)) / b + np.trace(n @ n)
                    + ((n ** 2).sum() + np.trace(n) ** 2) / b) / a
            tot += ((n ** 2).sum() + np.trace(n @ n)) / b
    gg = np.array([(g * g).sum() for g in gs])
    hh = np.array([(h * h).sum() for h in hs])
    gh = np.array([(g * h).sum() for g, h in zip(gs, hs)])
    tot += (gg.sum() * hh.sum() - (gg * hh).sum() + gh.sum() ** 2 - (gh ** 2).sum()) / proj.dim
    return float(tot)


def rademacher_variance(x: np.ndarray, y: np.ndarray, dim: int) -> float:
    """Var of <R^T x, R^T y> / dim for R with independent +-1 entries."""
    return float(((x @ x) * (y @ y) + (x @ y) ** 2 - 2 * ((x * x) * (y * y)).sum()) / dim)


def _z_scores(projected: torch.Tensor, exact_vectors: np.ndarray, variance) -> np.ndarray:
    """(estimate - exact) / std for every pair i <= j (norms included)."""
    p = projected.double().numpy()
    zs = []
    for i in range(len(p)):
        for j in range(i, len(p)):
            exact = exact_vectors[i] @ exact_vectors[j]
            zs.append((p[i] @ p[j] - exact) / np.sqrt(variance(i, j)))
    return np.array(zs)


SEEDS = range(4)  # z-scores pooled over a few projection seeds: the pairs of one seed share a map


def _jl_ok(zs: np.ndarray) -> bool:
    # every pair within 5 standard deviations, and the mean squared z (1 in expectation for an
    # unbiased estimator with the stated variance) not above 2: a wrong scale, a bias or extra
    # variance (e.g. factors shared between matrices) shows up in the second condition
    return bool(np.abs(zs).max() < 5 and (zs ** 2).mean() < 2)


def _gradients(n: int, layout, seed: int) -> list[list[np.ndarray]]:
    """Gradient-like test points: full-rank, rank-1 (one token) and mass-in-one-matrix blocks,
    in correlated groups, so that inner products are far from zero."""
    rng = np.random.default_rng(seed)
    base = [rng.normal(size=s) for _, s in layout]
    out = []
    for k in range(n):
        blocks = []
        for m, (_, (o, i)) in enumerate(layout):
            if k % 3 == 0:
                b = rng.normal(size=(o, i))
            elif k % 3 == 1:
                b = np.outer(rng.normal(size=o), rng.normal(size=i))
            else:
                b = rng.normal(size=(o, i)) * (3.0 if m == k % len(layout) else 0.2)
            blocks.append(0.7 * base[m] + b)
        out.append(blocks)
    return out


def _flat(blocks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([b.ravel() for b in blocks])


# ---------------------------------------------------------------- kronecker
def test_kronecker_plan_maps_every_matrix_to_dim():
    for o, i in [(4, 96), (96, 4), (16, 4096), (4096, 16), (6, 10), (160, 160), (7, 9)]:
        for dim in (12, 64, 1024, 8192):
            mode, a, b = kronecker_plan(o, i, dim)
            assert a * b == dim
            if mode == "rows":
                assert a == o
            if mode == "cols":
                assert b == i
    assert kronecker_plan(4, 96, 1024) == ("rows", 4, 256)
    assert kronecker_plan(96, 4, 1024) == ("cols", 256, 4)
    assert kronecker_plan(6, 10, 1024) == ("both", 32, 32)


def _jl_trials(seed: int, project):
    """z-scores of the projected inner products over SEEDS, for the sketch as it is and for the same
    sketch 15% off in scale. ``project(s, x, pts, flat)`` -> (projected x, variance(i, j))."""
    pts = _gradients(12, LAYOUT, seed=seed)
    flat = np.stack([_flat(b) for b in pts])
    x = torch.tensor(flat, dtype=torch.float32)
    zs, off = [], []
    for s in SEEDS:
        y, var = project(s, x, pts, flat)
        zs.append(_z_scores(y, flat, var))
        off.append(_z_scores(y * 1.15 ** 0.5, flat, var))
    return np.concatenate(zs), np.concatenate(off)


def test_kronecker_keeps_inner_products_within_jl_tolerance():
    rel = []

    def project(seed, x, pts, flat):
        proj = Kronecker(LAYOUT, 1024, seed=seed)
        assert {p[0] for p in proj.plans} == {"rows", "cols", "both"}
        # the tolerance is meaningful: relative std of a squared norm well below 1
        rel.extend(np.sqrt(kronecker_variance(proj, pts[i], pts[i])) / (flat[i] @ flat[i]) for i in range(len(pts)))
        return proj(x), lambda i, j: kronecker_variance(proj, pts[i], pts[j])

    zs, off = _jl_trials(1, project)
    assert max(rel) < 0.15, rel
    assert _jl_ok(zs), (np.abs(zs).max(), (zs ** 2).mean())
    # ... and it fails a sketch 15% off in scale
    assert not _jl_ok(off), (np.abs(off).max(), (off ** 2).mean())


def test_kronecker_matrices_do_not_share_factors():
    """Two identically shaped matrices get independent factors (shared factors would make the
    sketch of g - h blind to moving mass between those two matrices)."""
    layout = [("a", (4, 64)), ("b", (4, 64))]
    proj = Kronecker(layout, 256, seed=0)
    assert not torch.equal(proj.factors(0)[2], proj.factors(1)[2])
    rng = np.random.default_rng(0)
    u = rng.normal(size=(4, 64))
    x = torch.tensor(np.concatenate([u.ravel(), -u.ravel()]), dtype=torch.float32)[None]
    assert proj(x).norm() > 0.5 * x.norm()  # shared factors would give exactly 0


def test_kronecker_equals_sum_of_kronecker_products_one_example_at_a_time():
    """vec_rows(L G R^T) = (L kron R) vec_rows(G): build the dense (dim x D) map from the factors
    and apply it to each example alone; the batched projection gives the same numbers."""
    proj = Kronecker(LAYOUT, 256, seed=3)
    dense = []
    for m, (_, (o, i)) in enumerate(proj.layout):
        mode, left, right = proj.factors(m)

        def as_matrix(f, n):
            if isinstance(f, tuple):  # signed permutation (perm, signs): row j = signs[j] * e_perm[j]
                perm, signs = f
                s = torch.zeros(n, n, dtype=torch.float64)
                s[torch.arange(n), perm] = signs.double()
                return s
            return f.double()

        dense.append(torch.kron(as_matrix(left, o), as_matrix(right, i)))
    dense = torch.cat(dense, dim=1)  # (dim, D): sum over matrices = concatenation of the columns
    assert dense.shape == (256, proj.in_dim)
    x = torch.randn(9, proj.in_dim, generator=torch.Generator().manual_seed(0))
    batched = proj(x)
    for k in range(len(x)):
        alone = dense @ x[k].double()
        torch.testing.assert_close(batched[k].double(), alone, rtol=1e-5, atol=1e-5)


def test_kronecker_batched_per_layer_equals_one_at_a_time_exactly():
    """Each matrix is projected on the batched (B, out, in) gradients; every example's result is
    bit-identical to projecting that example alone, and to projecting the per-layer blocks."""
    layout = [(n, s) for n, s in LAYOUT if n != "extra"] + [("l1.v.lora_A", (16, 160)), ("l1.v.lora_B", (160, 16))]
    proj = Kronecker(layout, 1024, seed=0)
    x = torch.randn(13, proj.in_dim, generator=torch.Generator().manual_seed(1))
    batched = proj(x)
    for k in range(len(x)):
        assert torch.equal(batched[k:k + 1], proj(x[k:k + 1]))
    # the per-layer entry point (what a caller holding the (B, out, in) blocks uses)
    blocks = [b.contiguous().clone() for b in proj.blocks(x)]
    assert [tuple(b.shape[1:]) for b in blocks] == [s for _, s in layout]
    assert torch.equal(proj.project_blocks(blocks), batched)
    with pytest.raises(ValueError, match="gradient blocks"):
        proj.project_blocks(blocks[:-1])
    with pytest.raises(ValueError, match="expects"):
        proj.project_layer(0, blocks[1])


def test_projections_are_seeded_and_shared_by_every_caller():
    x = torch.randn(5, Kronecker(LAYOUT, 512).in_dim, generator=torch.Generator().manual_seed(2))
    for make in (lambda s: Kronecker(LAYOUT, 512, seed=s), lambda s: Rademacher(x.shape[1], 512, seed=s)):
        pool_side, val_side = make(7), make(7)  # two instances, as in two processes
        a = pool_side(x)
        assert torch.equal(a, val_side(x))
        # alone vs in a batch: bit-identical for kronecker (tested above); dense rademacher goes
        # through one (B, D) @ (D, d) product whose rounding may depend on B
        torch.testing.assert_close(a[2:3], val_side(x[2:3]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, make(8)(x))
    # the seed is per matrix name, not per position: renaming a matrix changes its factors
    renamed = [("other", LAYOUT[0][1])] + LAYOUT[1:]
    assert not torch.equal(Kronecker(renamed, 512, 7).factors(0)[2], Kronecker(LAYOUT, 512, 7).factors(0)[2])


def test_make_projection_kronecker_needs_the_layout():
    with pytest.raises(ValueError, match="layout"):
        make_projection("kronecker", 100, 64, 0)
    with pytest.raises(ValueError, match="covers"):
        make_projection("kronecker", 100, 64, 0, layout=[("a", (4, 10))])
    p = make_projection("kronecker", 40, 64, 0, layout=[("a", (4, 10))])
    assert p.meta()["kind"] == "kronecker" and p.meta()["dim"] == 64 and p.meta()["in_dim"] == 40


# ---------------------------------------------------------------- rademacher
def test_rademacher_keeps_inner_products_within_jl_tolerance():
    def project(seed, x, pts, flat):
        return Rademacher(flat.shape[1], 1024, seed=seed)(x), lambda i, j: rademacher_variance(flat[i], flat[j], 1024)

    zs, off = _jl_trials(4, project)
    assert _jl_ok(zs), (np.abs(zs).max(), (zs ** 2).mean())
    assert not _jl_ok(off), (np.abs(off).max(), (off ** 2).mean())


# ---------------------------------------------------------------- metadata compatibility
def _meta(kind="kronecker", dim=256, seed=0, grad_dim=1000, layout="abc"):
    p = {"kind": kind, "dim": dim, "seed": seed, "in_dim": grad_dim}
    if kind == "kronecker":
        p["layout_sha1"] = layout
    return {"projection": p, "grad_dim": grad_dim}


def test_check_compatible_refuses_different_projections_in_one_line():
    assert check_compatible({"pool": _meta(), "val": _meta()})["kind"] == "kronecker"
    for other in (_meta(seed=1), _meta(dim=512), _meta(kind="rademacher"), _meta(grad_dim=999), _meta(layout="xyz")):
        with pytest.raises(ValueError, match="refusing to combine") as err:
            check_compatible({"pool": _meta(), "val": other})
        assert "\n" not in str(err.value)
    # without a projection the seed is irrelevant
    check_compatible({"pool": _meta("none", 1000, 0), "val": _meta("none", 1000, 5)})
    with pytest.raises(ValueError, match="no 'projection'"):
        check_compatible({"pool": _meta(), "val": {"grad_dim": 1000}})


# ---------------------------------------------------------------- streamed scores
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_stream_scores_equals_in_memory_product(tmp_path, dtype, chunk_rows):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(203, 48)).astype(dtype)
    path = tmp_path / "pool.npy"
    store = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=feats.shape)
    for s in range(0, len(feats), 50):  # written in chunks, as a store is
        store[s:s + 50] = feats[s:s + 50]
    store.flush()
    del store
    means = rng.normal(size=(5, 48)).astype(np.float32)
    got = stream_scores(path, means, chunk_rows=chunk_rows)
    want = feats.astype(np.float64) @ means.T.astype(np.float64)
    assert got.shape == (203, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="dim"):
        stream_scores(path, means[:, :10])


def test_stream_scores_detects_a_truncated_store(tmp_path):
    path = tmp_path / "pool.npy"
    np.save(path, np.ones((10, 4), dtype=np.float16))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="file ends"):
        stream_scores(path, np.ones((2, 4), dtype=np.float32), chunk_rows=3)


# ---------------------------------------------------------------- config
def test_kronecker_is_a_config_choice(compose_cfg):
    from icons.config import ProjectionConfig, validate

    obj = validate(compose_cfg(["projection=kronecker"]))
    assert obj.projection.kind == "kronecker"
    defaults = ProjectionConfig()
    assert (obj.projection.dim, obj.projection.seed, obj.projection.dtype) == (defaults.dim, defaults.seed, defaults.dtype)
    assert OmegaConf.select(compose_cfg(["projection=kronecker", "projection.dim=2048"]), "projection.dim") == 2048


# ---------------------------------------------------------------- feature stores (tiny model)
@pytest.fixture(scope="module")
def tiny():
    return tiny_lora_model()


def _records():
    def rec(i, q, a, task=None):
        r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if task:
            r["task"] = task
        return r

    pool = [rec(0, "What is 3 plus 4 ?", "3 plus 4 is 7 ."), rec(1, "Is 5 even or odd ?", "5 is odd ."),
            rec(2, "What is 9 minus 2 ?", "9 minus 2 is 7 ."), rec(3, "How many sides does a square have ?", "A square has 4 sides .")]
    val = [rec(10, "What is 1 plus 1 ?", "1 plus 1 is 2 .", "math"), rec(11, "Does a square have corners ?", "Yes .", "shapes")]
    return pool, val


def test_kronecker_store_uses_one_map_for_pool_and_validation(tiny, tmp_path):
    from icons.data.encode import Encoder, collate
    from icons.features.extract import extract
    from icons.features.store import feature_meta, load_group_scores
    from icons.features.grads import lora_parameters, reference_grads
    from icons.influence import direct_scores

    tok, model = tiny
    pool, val = _records()
    enc = Encoder(tok, 16, 32, 160)
    meta = extract(model, enc, pool, val, tmp_path, None, "kronecker", 64, 5, batch_size=3)
    layout = [(n, tuple(p.shape)) for n, p in lora_parameters(model)]
    fresh = Kronecker(layout, 64, seed=5)  # a separate instance, as another process would build
    assert meta["projection"] == fresh.meta()
    for which, recs in (("pool", pool), ("val", val)):
        g = reference_grads(model, collate([enc.encode(r) for r in recs], tok.pad_token_id))
        want = fresh(g)
        want = (want / want.norm(dim=1, keepdim=True)).numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"{which}.npy"), want, rtol=1e-4, atol=1e-5)
        m = feature_meta(tmp_path, which)
        assert (m["projection"]["kind"], m["projection"]["dim"], m["projection"]["seed"], m["grad_dim"]) == \
            ("kronecker", 64, 5, fresh.in_dim)
    scores, groups, _ = load_group_scores(tmp_path)
    np.testing.assert_allclose(scores[:, groups.index("math")],
                               direct_scores(np.load(tmp_path / "pool.npy"), np.load(tmp_path / "val.npy")[:1]),
                               rtol=1e-4, atol=1e-6)


def test_scoring_refuses_features_from_different_projections(tiny, tmp_path):
    from icons.data.encode import Encoder
    from icons.features.extract import extract
    from icons.features.store import check_feature_dirs, score_stored

    tok, model = tiny
    pool, val = _records()
    enc = Encoder(tok, 16, 32, 160)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    extract(model, enc, pool, val, a, None, "kronecker", 64, 0, batch_size=4, dtype="float16")
    extract(model, enc, pool, val, b, None, "kronecker", 64, 1, batch_size=4)
    extract(model, enc, pool, val, c, None, "rademacher", 64, 0, batch_size=4)
    # same directory: stored features streamed against their own means = the scores written in extract
    scores, groups, ids = score_stored(a, a, chunk_rows=3)
    np.testing.assert_allclose(scores, np.load(a / "pool_scores.npy"), atol=2e-3)  # float16 store
    assert ids == [r["id"] for r in pool]
    assert check_feature_dirs([a])["seed"] == 0
    for other in (b, c):
        with pytest.raises(ValueError, match="refusing to combine") as err:
            score_stored(a, other)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="refusing to combine"):
            check_feature_dirs([a, other])
    # a directory whose validation means were redone with another projection
    (a / "val_meta.json").write_text((b / "val_meta.json").read_text())
    with pytest.raises(ValueError, match="seed differ"):
        check_feature_dirs([a])
    # resuming a pool store with another projection is refused too
    with pytest.raises(ValueError, match="refusing to combine"):
        extract(model, enc, pool, val, b, None, "kronecker", 64, 2, batch_size=4)


@pytest.mark.parametrize("cache", ["float32", "int8", "none"])
def test_rademacher_accumulated_per_matrix_equals_projecting_the_concatenation(cache):
    """The projection of a concatenation is the sum of each matrix's product with its own rows of
    R, including matrices that straddle the 4096-row generation blocks (and when blocks are
    regenerated instead of cached)."""
    from icons.features.projection import BLOCK_ROWS

    shapes = [(4, 1000), (3000, 2), (7, 700), (1, 5000), (33, 3)]
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(5, o, i, generator=g) for o, i in shapes]
    flat = torch.cat([b.flatten(1) for b in blocks], 1)
    assert flat.shape[1] > 2 * BLOCK_ROWS
    limits = {"float32": {}, "int8": {"FLOAT_CACHE_LIMIT": 0}, "none": {"FLOAT_CACHE_LIMIT": 0, "CACHE_LIMIT": 0}}
    proj = type("R", (Rademacher,), limits[cache])(flat.shape[1], 96, seed=2)
    assert torch.equal(proj(flat), Rademacher(flat.shape[1], 96, seed=2)(flat))  # caching changes no number
    # Same sums in another order: fp32 rounding over ~20k terms (and thread-dependent BLAS order)
    # moves results by ~1e-6 of their scale; a misplaced row of R moves them by O(scale).
    whole = proj(flat)
    torch.testing.assert_close(proj.project_blocks(blocks), whole, rtol=0, atol=1e-5 * float(whole.abs().max()))
    # a wrong split (one matrix missing) is refused, not silently projected with shifted rows
    with pytest.raises(ValueError, match="cover"):
        proj.project_blocks(blocks[:-1])
    # the identity's blocks: the concatenation
    ident = make_projection("none", flat.shape[1], 0, 0)
    assert torch.equal(ident.project_blocks(blocks), flat)


def test_rademacher_refuses_a_map_it_would_regenerate_for_hours():
    # LLaVA-7B at r 128 with dim 5120: 3.2e8 x 5120 signs per batch; refused before any allocation
    with pytest.raises(ValueError, match="kronecker"):
        make_projection("rademacher", 320_000_000, 5120, 0)
