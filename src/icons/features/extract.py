"""Step 2 of ICONS: gradient features at one warmup checkpoint, and their scores per val group.

Validation examples: plain gradients -> projection -> L2-normalised -> one mean vector per
validation group (task, or task/sub-task, plus the union for the ``merge`` ablation).
Pool examples: Adam-preconditioned (or plain, ``gradient=sgd``) gradients -> projection ->
normalised -> dot product with every group mean, written in place into a pre-allocated
``pool_scores.npy`` (N x G) with a done-mask, so an interrupted run resumes where it stopped.
With a projection, the normalised pool features themselves are stored too (``pool.npy``).
Without one (the exact mode), features are never stored: only their scores are.

Every feature set records how it was made: ``val_meta.json`` (validation features and group
means) and ``pool_meta.json`` (pool features and scores) hold the projection's kind, dim, seed
and the gradient dim (plus the Kronecker layout hash). A resumed run refuses to continue a pool
store made with another projection, and scoring refuses to combine sets that disagree
(``check_feature_dirs``, ``score_stored``; the rule is ``influence.check_compatible``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.encode import Encoder, collate
from ..influence import (MERGE, adam_precondition, check_compatible, group_means, group_of, normalise_rows,
                         stream_scores)
from ..io import atomic_write_bytes, read_json, write_json
from .grads import PerExampleGrads
from .projection import make_projection


def batch_plan(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (less padding). The plan depends only on the
    lengths, never on what is already done, so a resumed run forms the same batches (same
    padding, same bytes) as an uninterrupted one."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _save_mask(path: Path, mask: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, mask, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def extract(model, encoder: Encoder, pool: list[dict], val: list[dict], out_dir: Path, moments: tuple | None,
            projection: str, dim: int, seed: int, batch_size: int, dtype: str = "float32",
            save_every_s: float = 30.0) -> dict:
    """Features and group scores at one checkpoint (``model`` already holds its LoRA weights)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with PerExampleGrads(model) as pe:
        proj = make_projection(projection, pe.dim, dim, seed, layout=[(n, tuple(p.shape)) for n, p in pe.params])
        made = {"projection": proj.meta(), "grad_dim": pe.dim}
        # ---- validation: one mean vector per group
        groups = sorted({group_of(r) for r in val}) + [MERGE]
        labels = [group_of(r) for r in val]
        v_items = [encoder.encode(r) for r in val]
        v_feats = torch.zeros(len(val), proj.dim)
        for idx in batch_plan([len(e.input_ids) for e in v_items], batch_size):
            g, _ = pe(collate([v_items[i] for i in idx], encoder.tok.pad_token_id))
            v_feats[idx] = normalise_rows(proj(g))
        means = group_means(v_feats, labels, groups)
        np.save(out_dir / "val_means.npy", means.numpy(), allow_pickle=False)
        write_json(out_dir / "val_meta.json", {**made, "gradient": "sgd", "n": len(val), "groups": groups})
        write_json(out_dir / "groups.json", groups)
        if projection != "none":
            np.save(out_dir / "val.npy", v_feats.numpy(), allow_pickle=False)
            write_json(out_dir / "val_ids.json", [r["id"] for r in val])
        # ---- pool: in place, resumable
        n = len(pool)
        scores_path, mask_path = out_dir / "pool_scores.npy", out_dir / "pool_done.npy"
        mode = "r+" if scores_path.exists() and mask_path.exists() else "w+"
        pool_made = {**made, "gradient": "adam" if moments is not None else "sgd", "n": n, "groups": groups}
        if mode == "r+":
            if not (out_dir / "pool_meta.json").exists():
                raise ValueError(f"cannot resume {out_dir}: its pool rows have no pool_meta.json (made by an older "
                                 f"version); delete the directory to extract again")
            old = read_json(out_dir / "pool_meta.json")
            check_compatible({f"stored pool features in {out_dir}": old, "this run": pool_made})
            if (old.get("gradient"), old.get("n"), old.get("groups")) != (pool_made["gradient"], n, groups):
                raise ValueError(f"cannot resume {out_dir}: stored pool rows were made with gradient={old.get('gradient')}, "
                                 f"n={old.get('n')}, groups={old.get('groups')}; this run has "
                                 f"gradient={pool_made['gradient']}, n={n}, groups={groups}")
        else:
            write_json(out_dir / "pool_meta.json", pool_made)
        scores = np.lib.format.open_memmap(scores_path, mode=mode, dtype=np.float32, shape=(n, len(groups)))
        feats = None
        if projection != "none":
            fpath = out_dir / "pool.npy"
            feats = np.lib.format.open_memmap(fpath, mode=mode if fpath.exists() else "w+",
                                              dtype=np.dtype(dtype), shape=(n, proj.dim))
        done = np.load(mask_path) if mode == "r+" else np.zeros(n, dtype=bool)
        if mode == "w+":
            write_json(out_dir / "pool_ids.json", [r["id"] for r in pool])
        lengths = [min(encoder.length(r), encoder.max_length) for r in pool]
        plan = [b for b in batch_plan(lengths, batch_size) if not done[b].all()]
        if moments is not None:
            m, v, info = moments
            m_flat = torch.cat([m[name].reshape(-1) for name in pe.names]).float()
            v_flat = torch.cat([v[name].reshape(-1) for name in pe.names]).float()
            beta1, beta2 = info["betas"]
            eps = info["eps"]
        last_save = time.time()
        for idx in plan:
            items = {i: encoder.encode(pool[i]) for i in idx}
            g, _ = pe(collate([items[i] for i in idx], encoder.tok.pad_token_id))
            if moments is not None:
                g = adam_precondition(g, m_flat, v_flat, beta1, beta2, eps)
            f = normalise_rows(proj(g))
            scores[idx] = (f @ means.T).numpy()
            if feats is not None:
                feats[idx] = f.numpy().astype(feats.dtype)
            done[idx] = True
            if time.time() - last_save > save_every_s:
                scores.flush()
                if feats is not None:
                    feats.flush()
                _save_mask(mask_path, done)  # after the rows it marks are on disk
                last_save = time.time()
        scores.flush()
        if feats is not None:
            feats.flush()
        _save_mask(mask_path, done)
        meta = {"projection": proj.meta(), "gradient": "adam" if moments is not None else "sgd",
                "grad_dim": pe.dim, "groups": groups, "n_pool": n, "n_val": len(val),
                "wall_s": round(time.time() - t0, 2)}
        write_json(out_dir / "meta.json", meta)
    return meta


def feature_meta(ckpt_dir: Path, which: str) -> dict:
    """How the ``which`` (``pool`` or ``val``) feature set of a checkpoint directory was made.
    Directories written before per-set metadata existed fall back to ``meta.json`` (there both
    sets came from one run with one projection)."""
    if which not in ("pool", "val"):
        raise ValueError(f"which must be 'pool' or 'val', got {which!r}")
    for name in (f"{which}_meta.json", "meta.json"):
        if (ckpt_dir / name).exists():
            return read_json(ckpt_dir / name)
    raise ValueError(f"{ckpt_dir}: no {which}_meta.json or meta.json: cannot tell how its {which} features were made")


def check_feature_dirs(ckpt_dirs: list[Path]) -> dict:
    """Pool and validation sets of every checkpoint directory, and all directories together,
    must come from the same projection (kind, dim, seed, gradient dim). Returns the signature."""
    metas = {}
    for d in ckpt_dirs:
        for which in ("pool", "val"):
            metas[f"{which} features in {d}"] = feature_meta(d, which)
    return check_compatible(metas)


def score_stored(pool_dir: Path, val_dir: Path, chunk_rows: int = 16384) -> tuple[np.ndarray, list[str], list[str]]:
    """(N x G scores, groups, pool ids): the stored pool features of ``pool_dir`` (``pool.npy``)
    against the validation group means of ``val_dir``, streamed in chunks. Both must come from
    the same projection (checked, as is that every pool row is done)."""
    check_compatible({f"pool features in {pool_dir}": feature_meta(pool_dir, "pool"),
                      f"validation means in {val_dir}": feature_meta(val_dir, "val")})
    if not (pool_dir / "pool.npy").exists():
        raise ValueError(f"{pool_dir}: no stored pool features (pool.npy); the exact mode stores only scores")
    done = np.load(pool_dir / "pool_done.npy")
    if not done.all():
        raise ValueError(f"{pool_dir}: {int((~done).sum())} pool rows have no features yet")
    means = np.load(val_dir / "val_means.npy")
    scores = stream_scores(pool_dir / "pool.npy", means, chunk_rows)
    return scores, read_json(val_dir / "groups.json"), read_json(pool_dir / "pool_ids.json")


def load_group_scores(ckpt_dir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(N x G scores, groups, pool ids) of a finished checkpoint directory."""
    done = np.load(ckpt_dir / "pool_done.npy")
    if not done.all():
        raise ValueError(f"{ckpt_dir}: {int((~done).sum())} pool rows have no features yet")
    return np.load(ckpt_dir / "pool_scores.npy"), read_json(ckpt_dir / "groups.json"), read_json(ckpt_dir / "pool_ids.json")
