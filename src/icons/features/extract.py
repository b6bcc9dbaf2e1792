"""Step 2 of ICONS: gradient features at one warmup checkpoint, and their scores per val group.

Validation examples: plain gradients -> projection -> L2-normalised -> one mean vector per
validation group (task, or task/sub-task, plus the union for the ``merge`` ablation).
Pool examples: plain (or Adam-preconditioned, ``gradient=adam``) gradients -> projection ->
normalised -> dot product with every group mean, written in place into a pre-allocated
``pool_scores.npy`` (N x G) with a done-mask, so an interrupted run resumes where it stopped.
With a projection, the normalised pool features themselves are stored too (``pool.npy``).
Without one (the exact mode), features are never stored: only their scores are.

Both passes are Lightning prediction loops (``predict.py``) over a fixed batch plan: the
:class:`GradientSteps` module computes a batch's rows (one batched backward, per-example
gradients from hooks, ``grads.py``), the :class:`StoreWriter` callback writes the pool's rows into
the store (``store.py``); the progress bar of a resumed run starts at the batches already done.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..data.encode import Encoder, collate
from ..distributed import barrier, dist_env
from ..influence import MERGE, adam_precondition, group_means, group_of, normalise_rows
from ..io import read_json, save_npy, slow_point, slow_stage, write_json
from ..predict import Rows, loader, predictor
from .grads import PerExampleGrads
from .plan import batch_plan, is_oom, oom_split, shard_plan
from .projection import make_projection
from .store import open_store


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


class GradientSteps(L.LightningModule):
    """``predict_step``: ``rows_fn(sub, items)`` for one planned batch, split in halves when it
    runs out of device memory (``plan.oom_split``); returns ``[(sub_rows, result), ...]``.

    ``checkpointing``: the model recomputes its layers' activations in the backward pass, which HF
    does only in training mode; the model is then put in training mode (it has no dropout: see
    ``loading.dropout_free``). The hooks see each LoRA matrix's input and output gradient once:
    the recomputation's copies are the same tensors' values under the same names."""

    def __init__(self, model, pe: PerExampleGrads, rows_fn, retries: list[int], checkpointing: bool = False):
        super().__init__()
        self.model, self.pe, self.rows_fn, self.retries = model, pe, rows_fn, retries
        self.checkpointing = checkpointing

    def on_predict_model_eval(self) -> None:
        self.model.train(self.checkpointing)

    def predict_step(self, batch: Rows, batch_idx: int = 0):
        return oom_split(lambda sub: self.rows_fn(sub, batch.data), batch.idx, self.retries, self.pe)


class StoreWriter(BasePredictionWriter):
    """Writes each batch's pool rows into the memory-mapped store; rows reach the file before the
    done mask says they are done (committed every ``save_every_s`` and at the end)."""

    def __init__(self, scores, feats, done, save_every_s: float):
        super().__init__("batch")
        self.scores, self.feats, self.done, self.save_every_s = scores, feats, done, save_every_s
        self.pending: list[int] = []
        self.rows = 0
        self.last = time.time()
        self.slow = slow_stage("features")  # crash-test hook: commit every batch, then pause

    def commit(self) -> None:
        self.scores.flush()
        if self.feats is not None:
            self.feats.flush()
        if self.pending:
            self.done[self.pending] = True
            self.done.flush()
            self.pending.clear()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for sub, (s_rows, f_rows) in prediction:
            self.scores[sub] = s_rows
            if self.feats is not None:
                self.feats[sub] = f_rows
        self.pending.extend(batch.idx)
        self.rows += len(batch.idx)
        if self.slow or time.time() - self.last > self.save_every_s:
            self.commit()
            self.last = time.time()
        slow_point("features")

    def on_predict_end(self, trainer, pl_module) -> None:
        self.commit()


def extract(model, encoder: Encoder, pool: list[dict], val: list[dict], out_dir: Path, moments: tuple | None,
            projection: str, dim: int, seed: int, batch_size: int, dtype: str = "float32",
            save_every_s: float = 30.0, rank: int = 0, world_size: int = 1, max_tokens: int | None = None,
            trainer_cfg=None, checkpointing: bool = False) -> dict:
    """Features and group scores at one checkpoint (``model`` already holds its LoRA weights and
    sits on its device).

    Gradients stream one LoRA matrix at a time (``PerExampleGrads.stream``): Adam preconditioning,
    the projection (accumulated per matrix) and, without a projection, the dot products with the
    full-size group means all work per matrix, so no (B, D) whole-model gradient is formed.

    Data parallel: ``rank`` of ``world_size`` processes takes every ``world_size``-th batch of the
    global, length-sorted ``batch_plan`` and writes its rows in place into the shared store
    (disjoint rows of one memory-mapped file; a row is marked done only after its scores are
    flushed). Every process computes the (small) validation means itself, rank 0 writes them. The
    store is finished when every row is done: whichever process sees that writes ``meta.json``.
    The result has ``complete`` (all rows done) and ``rows_done`` (by this process).

    ``checkpointing``: gradient checkpointing on the model's layers (memory for larger batches;
    the same features); a model with dropout is extracted without it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    t0 = time.time()
    retries: list[int] = []  # sizes of batches split in halves after running out of memory
    device = next(model.parameters()).device
    if checkpointing:
        from ..models.loading import dropout_free, set_gradient_checkpointing

        checkpointing = dropout_free(model)
        set_gradient_checkpointing(model, checkpointing)
    with PerExampleGrads(model) as pe:
        proj = make_projection(projection, pe.dim, dim, seed, layout=[(n, tuple(p.shape)) for n, p in pe.params])
        made = {"projection": proj.meta(), "grad_dim": pe.dim}
        exact = projection == "none"
        pad = encoder.tok.pad_token_id

        def run_loop(plan, rows_fn, make, label, done=0, total=None, callbacks=()):
            trainer = predictor(trainer_cfg, label, done, total, grad=True, callbacks=callbacks)
            return trainer.predict(GradientSteps(model, pe, rows_fn, retries, checkpointing), loader(plan, make),
                                   return_predictions=not callbacks)

        # ---- validation: one mean vector per group (per LoRA matrix, in the exact mode)
        groups = sorted({group_of(r) for r in val}) + [MERGE]
        labels = [group_of(r) for r in val]
        v_items = [encoder.encode(r) for r in val]
        v_plan = batch_plan([len(e.input_ids) for e in v_items], batch_size, max_tokens)
        v_make = lambda rows: Rows(rows, {i: v_items[i] for i in rows})  # noqa: E731
        if exact:
            mean_blocks = _exact_val_means(pe, groups, labels, v_plan, v_make, run_loop, pad, device)
            means = None
        else:
            v_feats = torch.zeros(len(val), proj.dim)

            def val_rows(sub, items):
                blocks, _ = pe.stream(collate([items[i] for i in sub], pad))
                return normalise_rows(proj.project_blocks(g for _, g in blocks)).cpu()

            for batch in run_loop(v_plan, val_rows, v_make, "features: validation"):
                for sub, rows_ in batch:
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
        pool_made = {**made, "gradient": "adam" if moments is not None else "sgd", "n": n, "groups": groups}
        scores, feats, done = open_store(out_dir, n, groups, pool_made, [r["id"] for r in pool],
                                         None if exact else proj.dim, dtype)
        feature_dtype = feats.dtype if feats is not None else None
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

        def pool_rows(sub, items):
            blocks, _ = pe.stream(collate([items[i] for i in sub], pad))
            blocks = _adam_blocks(blocks, mv, beta1, beta2, eps)
            if exact:
                return _exact_scores(blocks, mean_blocks).cpu().numpy(), None
            f = normalise_rows(proj.project_blocks(g for _, g in blocks))
            return (f @ means_dev.T).cpu().numpy(), f.cpu().numpy().astype(feature_dtype)

        writer = StoreWriter(scores, feats, done, save_every_s)
        if todo:
            run_loop(todo, pool_rows, lambda rows: Rows(rows, {i: encoder.encode(pool[i]) for i in rows}),
                     "features: pool", done=len(mine) - len(todo), total=len(mine), callbacks=[writer])
        complete = bool(done.all())
        meta = {"projection": proj.meta(), "gradient": "adam" if moments is not None else "sgd",
                "grad_dim": pe.dim, "groups": groups, "n_pool": n, "n_val": len(val),
                "wall_s": round(time.time() - t0, 2), "oom_retries": len(retries)}
        if world_size > 1 or max_tokens is not None:
            meta.update(world_size=world_size, max_tokens=max_tokens)
        if complete:
            write_json(out_dir / "meta.json", meta)
        del scores, feats, done, writer
    model.eval()
    return {**meta, "complete": complete, "rank": rank, "rows_done": sum(len(b) for b in todo)}


def _exact_val_means(pe, groups, labels, v_plan, v_make, run_loop, pad, device) -> dict[str, torch.Tensor]:
    """Per group and LoRA matrix, the mean of the normalised validation gradients (float32, on the
    model's device). Two sweeps over the kept activations of each batch, norms first, then the
    sums, so a validation example's whole gradient is never held either."""
    member = torch.zeros(len(groups), len(labels))
    for j, lab in enumerate(labels):
        for g in (lab, MERGE):
            member[groups.index(g), j] = 1.0
    counts = member.double().sum(1)
    if (counts == 0).any():
        raise ValueError(f"validation groups without examples: {[g for g, c in zip(groups, counts) if c == 0]}")
    sums = {n: torch.zeros(len(groups), p.numel(), device=device) for n, p in pe.params}

    def val_sums(sub, items):  # an out-of-memory before the first sum is touched splits the batch
        pe.backward(collate([items[i] for i in sub], pad))
        n2 = sum((g.reshape(len(sub), -1) ** 2).sum(1) for _, g in pe.blocks(release=False))
        inv = 1.0 / n2.sqrt().clamp_min(1e-30)
        w = member[:, sub].to(device) * inv[None, :]
        try:
            for name, g in pe.blocks():
                sums[name].addmm_(w, g.reshape(len(sub), -1))
        except RuntimeError as err:  # sums partly updated: a retry would count rows twice
            if is_oom(err):
                raise MemoryError(f"ran out of device memory while adding validation batch {sub[:3]}... "
                                  f"to the group sums; lower gradient.batch_size") from err
            raise

    run_loop(v_plan, val_sums, v_make, "features: validation")
    inv_counts = (1.0 / counts).float().to(device)[:, None]
    return {n: s.mul_(inv_counts) for n, s in sums.items()}


def extract_distributed(*args, rank: int | None = None, world_size: int | None = None, **kwargs) -> dict:
    """``extract`` for this process's share, then wait for every rank (if a process group is up).
    Returns the finished store's ``meta.json`` (plus this rank's ``rows_done``); raises if rows
    are still missing after the barrier (a rank failed)."""
    if rank is None or world_size is None:
        rank, world_size, _ = dist_env()
    meta = extract(*args, rank=rank, world_size=world_size, **kwargs)
    barrier()
    out_dir = Path(args[4] if len(args) > 4 else kwargs["out_dir"])
    if not meta["complete"]:
        if not (out_dir / "meta.json").exists():
            raise RuntimeError(f"{out_dir}: pool rows are still missing after every rank finished "
                               f"(world_size={world_size}); rerun to resume")
        meta = {**read_json(out_dir / "meta.json"), "complete": True, "rank": rank, "rows_done": meta["rows_done"]}
    return meta

