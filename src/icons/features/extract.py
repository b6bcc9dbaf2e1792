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

import contextlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..data.encode import Encoder, collate
from ..influence import (MERGE, adam_precondition, check_compatible, group_means, group_of, normalise_rows,
                         stream_scores)
from ..io import ResourceError, human_bytes, read_json, save_npy, slow_point, slow_stage, write_json
from .grads import PerExampleGrads
from .projection import make_projection


def batch_plan(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices in batches of similar length (less padding). The plan depends only on the
    lengths, never on what is already done (nor on how many processes share it), so a resumed
    or sharded run forms the same batches (same padding, same bytes) as an uninterrupted one.

    With ``max_tokens``, a batch also stays within that padded size: ``len(batch) * longest``
    ``<= max_tokens`` (rows sorted by length, filled greedily; a row longer than the budget
    on its own gets a batch of its own)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError("max_tokens must be >= 1 (or None)")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if max_tokens is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    plan, cur = [], []
    for i in order:  # ascending length: the row being added is the longest of its batch
        if cur and (len(cur) == batch_size or (len(cur) + 1) * lengths[i] > max_tokens):
            plan.append(cur)
            cur = []
        cur.append(i)
    if cur:
        plan.append(cur)
    return plan


def shard_plan(plan: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s share of a global batch plan: every ``world_size``-th batch (the plan is
    sorted by length, so the shares have similar token counts)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return plan[rank::world_size]


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (``flock``) held while the block runs: several processes
    creating or checking the shared pool store one at a time."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_oom(err: BaseException) -> bool:
    """CUDA (or any device's) out-of-memory: ``torch.cuda.OutOfMemoryError`` or a RuntimeError
    whose message says so."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def _oom_split(fn, idx: list[int], retries: list[int], pe=None) -> list[tuple[list[int], object]]:
    """``[(idx, fn(idx))]``; if ``fn`` runs out of memory, the batch is split in halves and each half
    tried again (recursively, down to single examples; a single example that does not fit re-raises).
    Each split is appended to ``retries`` (the size of the batch that failed). Examples are never
    truncated; per-example gradients do not depend on the batch they are in (up to float rounding
    from the different padding), so the rows equal the un-split computation."""
    try:
        return [(idx, fn(idx))]
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not _is_oom(err) or len(idx) == 1:
            raise
    # out of the except block, so the failed attempt's tensors (held by the traceback) are freed
    retries.append(len(idx))
    if pe is not None:
        pe.model.zero_grad(set_to_none=True)
        for kept in (getattr(pe, "_inputs", None), getattr(pe, "_grads", None)):
            if kept is not None:
                kept.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    h = (len(idx) + 1) // 2
    return _oom_split(fn, idx[:h], retries, pe) + _oom_split(fn, idx[h:], retries, pe)


def check_disk_space(out_dir: Path, need: int, what: str = "feature store") -> None:
    """Stop with one line (:class:`ResourceError`) when ``out_dir``'s file system has less than
    ``need`` bytes free (memory-mapped stores are sparse: without this they fail mid-run)."""
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ResourceError(f"not enough disk space for the {what} in {out_dir}: needs {human_bytes(need)} "
                            f"({need} bytes), {human_bytes(free)} ({free} bytes) free")


def _adam_blocks(blocks, moments: dict | None, beta1: float = 0.0, beta2: float = 0.0, eps: float = 0.0):
    """Per-matrix LESS Adam direction, each matrix with its own moments (elementwise, so equal to
    preconditioning the concatenated gradient)."""
    for name, g in blocks:
        if moments is not None:
            m, v = moments[name]
            g = adam_precondition(g, m, v, beta1, beta2, eps)
        yield name, g


def _exact_scores(blocks, means: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, G) ``<g / |g|, mean_q>`` accumulated matrix by matrix: each example's dot product with
    every group mean and its squared norm, never the (B, D) gradient."""
    dots = n2 = None
    for name, g in blocks:
        x = g.reshape(g.shape[0], -1)
        if dots is None:
            dots = torch.zeros(x.shape[0], means[name].shape[0], dtype=torch.float32, device=x.device)
            n2 = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        dots.addmm_(x, means[name].T)
        n2 += (x * x).sum(1)
    return dots / n2.sqrt().clamp_min(1e-30)[:, None]


def extract(model, encoder: Encoder, pool: list[dict], val: list[dict], out_dir: Path, moments: tuple | None,
            projection: str, dim: int, seed: int, batch_size: int, dtype: str = "float32",
            save_every_s: float = 30.0, rank: int = 0, world_size: int = 1, max_tokens: int | None = None) -> dict:
    """Features and group scores at one checkpoint (``model`` already holds its LoRA weights).

    Gradients stream one LoRA matrix at a time (``PerExampleGrads.stream``): Adam preconditioning,
    the projection (accumulated per matrix) and, without a projection, the dot products with the
    full-size group means all work per matrix, so no (B, D) whole-model gradient is formed.

    Data parallel: ``rank`` of ``world_size`` processes takes every ``world_size``-th batch of the
    global, length-sorted ``batch_plan`` and writes its rows in place into the shared pre-allocated
    ``pool_scores.npy`` / ``pool.npy`` and the shared done mask ``pool_done.npy`` (disjoint rows
    of one memory-mapped file; a row is marked done only after its scores are flushed). The first
    process to arrive creates the store under a file lock; there is no merge step. Every process
    computes the (small) validation means itself, rank 0 writes them. The store is finished when
    every row is done: whichever process sees that writes ``meta.json``. The result has
    ``complete`` (all rows done) and ``rows_done`` (by this process).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    t0 = time.time()
    retries: list[int] = []  # sizes of batches split in halves after running out of memory
    device = next(model.parameters()).device
    with PerExampleGrads(model) as pe:
        proj = make_projection(projection, pe.dim, dim, seed, layout=[(n, tuple(p.shape)) for n, p in pe.params])
        made = {"projection": proj.meta(), "grad_dim": pe.dim}
        exact = projection == "none"
        pad = encoder.tok.pad_token_id
        # ---- validation: one mean vector per group (per LoRA matrix, in the exact mode)
        groups = sorted({group_of(r) for r in val}) + [MERGE]
        labels = [group_of(r) for r in val]
        v_items = [encoder.encode(r) for r in val]
        v_plan = batch_plan([len(e.input_ids) for e in v_items], batch_size, max_tokens)
        if exact:
            # sums of normalised gradients per group and matrix (float32, on the model's device).
            # Two sweeps over the kept activations of each batch: norms first, then the sums,
            # so a validation example's whole gradient is never held either.
            member = torch.zeros(len(groups), len(val))
            for j, lab in enumerate(labels):
                for g in (lab, MERGE):
                    member[groups.index(g), j] = 1.0
            counts = member.double().sum(1)
            if (counts == 0).any():
                raise ValueError(f"validation groups without examples: {[g for g, c in zip(groups, counts) if c == 0]}")
            sums = {n: torch.zeros(len(groups), p.numel(), device=device) for n, p in pe.params}
            def val_sums(idx):  # an out-of-memory before the first sum is touched splits the batch
                pe.backward(collate([v_items[i] for i in idx], pad))
                n2 = sum((g.reshape(len(idx), -1) ** 2).sum(1) for _, g in pe.blocks(release=False))
                inv = 1.0 / n2.sqrt().clamp_min(1e-30)
                w = member[:, idx].to(device) * inv[None, :]
                try:
                    for name, g in pe.blocks():
                        sums[name].addmm_(w, g.reshape(len(idx), -1))
                except RuntimeError as err:  # sums partly updated: a retry would count rows twice
                    if _is_oom(err):
                        raise MemoryError(f"ran out of device memory while adding validation batch {idx[:3]}... "
                                          f"to the group sums; lower gradient.batch_size") from err
                    raise

            for idx in v_plan:
                _oom_split(val_sums, idx, retries, pe)
            inv_counts = (1.0 / counts).float().to(device)[:, None]
            mean_blocks = {n: s.mul_(inv_counts) for n, s in sums.items()}
            means = None
        else:
            v_feats = torch.zeros(len(val), proj.dim)
            def val_rows(idx):
                blocks, _ = pe.stream(collate([v_items[i] for i in idx], pad))
                return normalise_rows(proj.project_blocks(g for _, g in blocks)).cpu()

            for idx in v_plan:
                for sub, rows_ in _oom_split(val_rows, idx, retries, pe):
                    v_feats[sub] = rows_
            means = group_means(v_feats, labels, groups)
            means_dev = means.to(device)
        if rank == 0:
            full = torch.cat([mean_blocks[n] for n in pe.names], 1).cpu() if exact else means
            save_npy(out_dir / "val_means.npy", full.numpy())
            del full
            write_json(out_dir / "val_meta.json", {**made, "gradient": "sgd", "n": len(val), "groups": groups})
            write_json(out_dir / "groups.json", groups)
            if not exact:
                save_npy(out_dir / "val.npy", v_feats.numpy())
                write_json(out_dir / "val_ids.json", [r["id"] for r in val])
        # ---- pool: in place, resumable, shared by all ranks
        n = len(pool)
        scores_path, mask_path = out_dir / "pool_scores.npy", out_dir / "pool_done.npy"
        fpath = out_dir / "pool.npy"
        pool_made = {**made, "gradient": "adam" if moments is not None else "sgd", "n": n, "groups": groups}
        with _file_lock(out_dir / ".pool.lock"):
            mode = "r+" if scores_path.exists() and mask_path.exists() else "w+"
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
            else:  # created once, by whichever process comes first; the mask last, so it marks a whole store
                item = np.dtype(dtype).itemsize if not exact else 0
                check_disk_space(out_dir, n * len(groups) * 4 + n * proj.dim * item + n)
                write_json(out_dir / "pool_meta.json", pool_made)
                write_json(out_dir / "pool_ids.json", [r["id"] for r in pool])
            scores = np.lib.format.open_memmap(scores_path, mode=mode, dtype=np.float32, shape=(n, len(groups)))
            feats = None
            if not exact:
                feats = np.lib.format.open_memmap(fpath, mode=mode if fpath.exists() else "w+",
                                                  dtype=np.dtype(dtype), shape=(n, proj.dim))
            if mode == "w+":
                scores.flush()
                if feats is not None:
                    feats.flush()
            done = np.lib.format.open_memmap(mask_path, mode=mode, dtype=bool, shape=(n,))
            if done.dtype != bool or done.shape != (n,):
                raise ValueError(f"{mask_path}: expected a ({n},) bool mask, got {done.shape} {done.dtype}")
        lengths = [min(encoder.length(r), encoder.max_length) for r in pool]
        mine = shard_plan(batch_plan(lengths, batch_size, max_tokens), rank, world_size)
        todo = [b for b in mine if not done[b].all()]
        if moments is not None:
            m, v, info = moments
            mv = {name: (m[name].float().to(device), v[name].float().to(device)) for name in pe.names}
            beta1, beta2 = info["betas"]
            eps = info["eps"]
        else:
            mv, beta1, beta2, eps = None, 0.0, 0.0, 0.0

        pending: list[int] = []

        def commit():  # rows reach the file before the mask says they are done
            scores.flush()
            if feats is not None:
                feats.flush()
            if pending:
                done[pending] = True
                done.flush()
                pending.clear()

        last_save = time.time()
        rows = 0
        def pool_rows(idx):
            items = [encoder.encode(pool[i]) for i in idx]
            blocks, _ = pe.stream(collate(items, pad))
            blocks = _adam_blocks(blocks, mv, beta1, beta2, eps)
            if exact:
                return _exact_scores(blocks, mean_blocks).cpu().numpy(), None
            f = normalise_rows(proj.project_blocks(g for _, g in blocks))
            return (f @ means_dev.T).cpu().numpy(), f.cpu().numpy().astype(feats.dtype)

        slow = slow_stage("features")  # crash-test hook: commit every batch, then pause
        for idx in todo:
            for sub, (s_rows, f_rows) in _oom_split(pool_rows, idx, retries, pe):
                scores[sub] = s_rows
                if feats is not None:
                    feats[sub] = f_rows
            pending.extend(idx)
            rows += len(idx)
            if slow or time.time() - last_save > save_every_s:
                commit()
                last_save = time.time()
            slow_point("features")
        commit()
        complete = bool(done.all())
        meta = {"projection": proj.meta(), "gradient": "adam" if moments is not None else "sgd",
                "grad_dim": pe.dim, "groups": groups, "n_pool": n, "n_val": len(val),
                "wall_s": round(time.time() - t0, 2), "oom_retries": len(retries)}
        if world_size > 1 or max_tokens is not None:
            meta.update(world_size=world_size, max_tokens=max_tokens)
        if complete:
            write_json(out_dir / "meta.json", meta)
        del scores, feats, done
    return {**meta, "complete": complete, "rank": rank, "rows_done": rows}


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
