"""Step 2 of ICONS: gradient features at one warmup checkpoint, and their scores per val group.

Validation examples: plain gradients -> projection -> L2-normalised -> one mean vector per
validation group (task, or task/sub-task, plus the union for the ``merge`` ablation).
Pool examples: Adam-preconditioned (or plain, ``gradient=sgd``) gradients -> projection ->
normalised -> dot product with every group mean, written in place into a pre-allocated
``pool_scores.npy`` (N x G) with a done-mask, so an interrupted run resumes where it stopped.
With a projection, the normalised pool features themselves are stored too (``pool.npy``).
Without one (the exact mode), features are never stored: only their scores are.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.encode import Encoder, collate
from ..influence import MERGE, adam_precondition, group_means, group_of, normalise_rows
from ..io import atomic_write_bytes, read_json, write_json
from .grads import PerExampleGrads
from .projection import make_projection


def _batches(items, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # less padding
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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
        proj = make_projection(projection, pe.dim, dim, seed)
        # ---- validation: one mean vector per group
        groups = sorted({group_of(r) for r in val}) + [MERGE]
        labels = [group_of(r) for r in val]
        v_items = [encoder.encode(r) for r in val]
        v_feats = torch.zeros(len(val), proj.dim)
        for idx in _batches(v_items, batch_size):
            g, _ = pe(collate([v_items[i] for i in idx], encoder.tok.pad_token_id))
            v_feats[idx] = normalise_rows(proj(g))
        means = group_means(v_feats, labels, groups)
        np.save(out_dir / "val_means.npy", means.numpy(), allow_pickle=False)
        write_json(out_dir / "groups.json", groups)
        if projection != "none":
            np.save(out_dir / "val.npy", v_feats.numpy(), allow_pickle=False)
            write_json(out_dir / "val_ids.json", [r["id"] for r in val])
        # ---- pool: in place, resumable
        n = len(pool)
        scores_path, mask_path = out_dir / "pool_scores.npy", out_dir / "pool_done.npy"
        mode = "r+" if scores_path.exists() and mask_path.exists() else "w+"
        scores = np.lib.format.open_memmap(scores_path, mode=mode, dtype=np.float32, shape=(n, len(groups)))
        feats = None
        if projection != "none":
            fpath = out_dir / "pool.npy"
            feats = np.lib.format.open_memmap(fpath, mode=mode if fpath.exists() else "w+",
                                              dtype=np.dtype(dtype), shape=(n, proj.dim))
        done = np.load(mask_path) if mode == "r+" else np.zeros(n, dtype=bool)
        if mode == "w+":
            write_json(out_dir / "pool_ids.json", [r["id"] for r in pool])
        # The batch plan covers every row and never depends on what is already done, so a
        # resumed run forms the same batches (same padding, same bytes) as an uninterrupted one.
        lengths = [len(encoder.encode(r).input_ids) for r in pool]
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        plan = [order[s:s + batch_size] for s in range(0, n, batch_size)]
        plan = [b for b in plan if not done[b].all()]
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


def load_group_scores(ckpt_dir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(N x G scores, groups, pool ids) of a finished checkpoint directory."""
    done = np.load(ckpt_dir / "pool_done.npy")
    if not done.all():
        raise ValueError(f"{ckpt_dir}: {int((~done).sum())} pool rows have no features yet")
    return np.load(ckpt_dir / "pool_scores.npy"), read_json(ckpt_dir / "groups.json"), read_json(ckpt_dir / "pool_ids.json")
