"""The batch plan of a feature set: rows in batches of similar length, shared out over ranks, and
split in halves when a batch runs out of device memory."""
from __future__ import annotations

import torch


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


def is_oom(err: BaseException) -> bool:
    """CUDA (or any device's) out-of-memory: ``torch.cuda.OutOfMemoryError`` or a RuntimeError
    whose message says so."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def oom_split(fn, idx: list[int], retries: list[int], pe=None) -> list[tuple[list[int], object]]:
    """``[(idx, fn(idx))]``; if ``fn`` runs out of memory, the batch is split in halves and each half
    tried again (recursively, down to single examples; a single example that does not fit re-raises).
    Each split is appended to ``retries`` (the size of the batch that failed). Examples are never
    truncated; per-example gradients do not depend on the batch they are in (up to float rounding
    from the different padding), so the rows equal the un-split computation."""
    try:
        return [(idx, fn(idx))]
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_oom(err) or len(idx) == 1:
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
    return oom_split(fn, idx[:h], retries, pe) + oom_split(fn, idx[h:], retries, pe)
