"""One forward pass of every pool (and validation) example under a model: what the baseline
selectors read, kept in a :class:`~icons.selectors.store.RowStore`.

Per example (answer tokens: those LLaVA's label masking keeps, ``data/encode.py``):

* ``loss``: mean negative log-likelihood of the answer tokens (perplexity = ``exp(loss)``);
* ``el2n``: mean over answer tokens of ``|softmax(logits) - onehot(label)|_2`` (Paul et al. 2021's
  error L2 norm, per token of a language model);
* ``answer_tokens``: how many answer tokens there are;
* ``embed``: the last hidden layer (after the final norm) mean-pooled over every token the model
  sees, image tokens included;
* ``embed_weighted``: the same layer pooled with weights proportional to position (token ``t`` of
  ``T`` weighs ``t / sum(1..T)``), RDS+'s pooling;
* ``coincide`` (when ``layers`` are given): COINCIDE's multi-layer activations, the attention
  output (``self_attn.o_proj``) of each of ``layers``, averaged over the image tokens and over the
  text tokens separately, each ``tanh``-ed and scaled to unit length, all concatenated and divided
  by ``sqrt(2 * len(layers))`` (unit length overall; a text-only record's image parts are zero).

A Lightning prediction loop over a fixed, length-sorted batch plan, sharded over ranks like the
gradient features (every rank writes its batches' rows in place; a resumed run skips done rows).
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..data.encode import IGNORE, collate
from ..features.plan import batch_plan, oom_split, shard_plan
from ..io import slow_point, slow_stage
from ..predict import Rows, loader, predictor
from .store import RowStore

SCALARS = ("loss", "el2n", "answer_tokens")


def columns(hidden: int, layers: list[int], dtype: str) -> dict[str, tuple[int, str]]:
    """The store's columns for a model of ``hidden`` width."""
    cols = {k: (1, "float32") for k in SCALARS}
    cols.update(embed=(hidden, dtype), embed_weighted=(hidden, dtype))
    if layers:
        cols["coincide"] = (2 * hidden * len(layers), dtype)
    return cols


def coincide_layers(n_layers: int, layers: list[int] | None) -> list[int]:
    """The layers COINCIDE reads: as given, or (null) the same depths as its 3, 7, 11, 15 and 19 of
    TinyLLaVA-2B's 24 layers (LLaVA-1.5-7B's 32: 4, 9, 15, 20, 25; the tiny model's 4: all)."""
    if layers is not None:
        bad = [k for k in layers if not 0 <= k < n_layers]
        if bad:
            raise ValueError(f"selector.coincide.layers={list(layers)}: the model has layers 0..{n_layers - 1}")
        return list(layers)
    return sorted({min(n_layers - 1, round(k / 24 * n_layers)) for k in (3, 7, 11, 15, 19)})


class AttentionOutputs:
    """Forward hooks keeping the ``self_attn.o_proj`` output of some decoder layers (by index)."""

    def __init__(self, model, layers: list[int]):
        names = {f".layers.{k}.self_attn.o_proj": k for k in layers}
        self.layers, self.out, self.handles = list(layers), {}, []
        for name, module in model.named_modules():
            k = next((k for suffix, k in names.items() if name.endswith(suffix)), None)
            if k is not None:  # under peft the LoRA wrapper itself, not its inner base_layer
                self.handles.append(module.register_forward_hook(self._keep(k)))
        if len(self.handles) != len(self.layers):
            raise ValueError(f"found {len(self.handles)} of the attention outputs of layers {self.layers}")

    def _keep(self, k: int):
        def hook(module, args, output):
            self.out[k] = output.detach()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def coincide_features(outputs: dict[int, torch.Tensor], layers: list[int], input_ids: torch.Tensor,
                      mask: torch.Tensor, image_id: int) -> torch.Tensor:
    """(B, 2 * len(layers) * H) COINCIDE features from the kept attention outputs."""
    image = (input_ids == image_id) & mask.bool()
    text = mask.bool() & ~image
    parts = []
    for k in layers:
        h = outputs[k].float()
        for where in (image, text):
            v = torch.tanh(pooled(h, where))
            parts.append(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.cat(parts, 1) / (2 * len(layers)) ** 0.5


def example_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, el2n, answer_tokens) per row of one batch: next-token predictions at the answer tokens."""
    y = labels[:, 1:]
    keep = y != IGNORE
    n = keep.sum(1)
    loss, el2n = torch.zeros(len(y)), torch.zeros(len(y))
    for i in range(len(y)):  # one row's logits at a time: a 7B batch's (B, T, 32000) would not fit twice
        if not n[i]:
            loss[i] = el2n[i] = float("nan")
            continue
        logp = torch.log_softmax(logits[i, :-1][keep[i]].float(), -1)
        t = y[i][keep[i]]
        p = logp.exp()
        p_true = p.gather(1, t[:, None])[:, 0]
        loss[i] = -logp.gather(1, t[:, None]).mean().cpu()
        el2n[i] = ((p * p).sum(1) - 2 * p_true + 1).clamp_min(0).sqrt().mean().cpu()
    return loss, el2n, n.float().cpu()


def pooled(hidden: torch.Tensor, mask: torch.Tensor, weighted: bool = False) -> torch.Tensor:
    """(B, H) pooled over the tokens ``mask`` keeps: the mean, or weights proportional to position."""
    m = mask.to(hidden.dtype)
    w = torch.cumsum(m, 1) * m if weighted else m
    return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def batch_values(model, batch: dict, attn: AttentionOutputs | None, image_id: int) -> dict[str, np.ndarray]:
    labels = batch.pop("labels")
    out = model(**batch, output_hidden_states=True, use_cache=False)
    loss, el2n, n = example_stats(out.logits, labels)
    mask = batch["attention_mask"]
    last = out.hidden_states[-1].float()
    values = {"loss": loss, "el2n": el2n, "answer_tokens": n, "embed": pooled(last, mask),
              "embed_weighted": pooled(last, mask, weighted=True)}
    if attn is not None:
        values["coincide"] = coincide_features(attn.out, attn.layers, batch["input_ids"], mask, image_id)
    return {k: v.cpu().numpy() for k, v in values.items()}


class ForwardSteps(L.LightningModule):
    """``predict_step``: one planned batch's values (halved on running out of memory)."""

    def __init__(self, model, pad_id: int, image_id: int, layers: list[int], retries: list[int]):
        super().__init__()
        self.model, self.pad_id, self.image_id, self.layers, self.retries = model, pad_id, image_id, layers, retries

    def on_predict_start(self) -> None:
        self.attn = AttentionOutputs(self.model, self.layers) if self.layers else None

    def on_predict_end(self) -> None:
        if self.attn is not None:
            self.attn.remove()

    def predict_step(self, batch: Rows, batch_idx: int = 0):
        def rows(sub):
            inputs = {k: v.to(self.device) for k, v in collate([batch.data[i] for i in sub], self.pad_id).items()}
            return batch_values(self.model, inputs, self.attn, self.image_id)

        return oom_split(rows, batch.idx, self.retries)


class StoreRows(BasePredictionWriter):
    """Each batch's rows into the store; committed every ``save_every_s`` and at the end."""

    def __init__(self, store: RowStore, save_every_s: float = 30.0):
        super().__init__("batch")
        self.store, self.save_every_s, self.last = store, save_every_s, time.time()
        self.slow = slow_stage("forward")  # crash-test hook: commit every batch, then pause

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for sub, values in prediction:
            self.store.write(sub, values)
        if self.slow or time.time() - self.last > self.save_every_s:
            self.store.commit()
            self.last = time.time()
        slow_point("forward")

    def on_predict_end(self, trainer, pl_module) -> None:
        self.store.commit()


def fill_store(model, encoder, records, out_dir: Path, prefix: str, made: dict, layers: list[int], dtype: str,
               batch_size: int, max_tokens: int | None = None, rank: int = 0, world_size: int = 1,
               trainer_cfg=None, save_every_s: float = 30.0) -> dict:
    """This rank's share of ``records``' rows (``model`` on its device, in eval mode). Returns
    ``{"rows_done": ..., "complete": ..., "wall_s": ...}``."""
    t0 = time.time()
    hidden = model.config.get_text_config().hidden_size
    store = RowStore.open(out_dir, len(records), columns(hidden, layers, dtype), {**made, "layers": list(layers)},
                          prefix)
    lengths = [min(encoder.length(r), encoder.max_length) for r in records]
    make = lambda rows: Rows(rows, {i: encoder.encode(records[i]) for i in rows})  # noqa: E731
    steps = ForwardSteps(model, encoder.tok.pad_token_id, encoder.image_id, list(layers), [])
    done = predict_into(store, batch_plan(lengths, batch_size, max_tokens), make, steps, f"forward: {prefix}", rank,
                        world_size, trainer_cfg, save_every_s)
    return {"rows_done": done, "complete": store.complete, "wall_s": round(time.time() - t0, 2)}


def predict_into(store: RowStore, plan: list[list[int]], make, steps: L.LightningModule, label: str, rank: int,
                 world_size: int, trainer_cfg=None, save_every_s: float = 30.0) -> int:
    """This rank's batches of a global ``plan`` not yet done, through ``steps`` (a prediction
    loop whose batches ``make(rows)`` builds) into ``store``. Returns the rows it did."""
    mine = shard_plan(plan, rank, world_size)
    todo = [b for b in mine if not store.done[b].all()]
    if todo:
        trainer = predictor(trainer_cfg, label, len(mine) - len(todo), len(mine),
                            callbacks=[StoreRows(store, save_every_s)])
        trainer.predict(steps, loader(todo, make), return_predictions=False)
    return sum(len(b) for b in todo)
