"""Training shells: a LightningModule that fine-tunes a LLaVA on LLaVA-format records.

Used for the stage-1 base (all parameters, streamed data), for training on a selected subset
(``mode=full``: projector + language model, vision tower frozen, the LLaVA stage-2 recipe; or
``mode=lora``), and for the ICONS warmup (LoRA). The learning rate of every step is recorded
(the warmup's checkpoints need their average learning rate).

Data parallel under ``trainer=ddp`` / ``trainer=fsdp`` (``parallel.py``): the batch sizes given
here are global; a step on W processes with accumulation is the same step as on one.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from . import parallel
from . import distributed
from .distributed import accumulation
from .data.encode import IGNORE, Encoded, Encoder, collate
from .features.grads import per_example_loss, token_losses

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    grad_clip: float = 1.0
    #: example_mean: every example weighs the same (mean over its own answer tokens, then over the
    #: batch); token_mean: HF's default, long answers dominate
    loss: str = "example_mean"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: the multimodal projector's own learning rate (LLaVA's mm_projector_lr); None = ``lr``
    projector_lr: float | None = None


def lr_factor(step: int, total: int, warmup_ratio: float, scheduler: str) -> float:
    warm = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    if scheduler == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


PROJECTOR = "multi_modal_projector"  # the projector's module name in transformers' LLaVA


def set_trainable(model, mode: str, projector: bool = False) -> None:
    """'all': every weight (stage-1 base); 'full': projector + language model (vision frozen);
    'lora': only LoRA weights (peft already froze the rest), plus the projector if ``projector``
    (LLaVA-1.5's LoRA recipe trains it)."""
    for name, p in model.named_parameters():
        if mode != "lora":
            p.requires_grad = mode == "all" or "vision_tower" not in name
        elif projector and PROJECTOR in name:
            p.requires_grad = True


def group_index(name: str, n_groups: int) -> int:
    """The optimizer group of a trainable parameter (see ``param_groups``): the projector's own
    group, when there is one, is the last."""
    return n_groups - 1 if PROJECTOR in name else 0


def param_groups(model, lr: float, projector_lr: float | None) -> list[dict]:
    """The trainable parameters as optimizer groups: the projector in a group of its own when it
    has its own learning rate. Group 0 is always the main one (its lr is the one recorded)."""
    lrs = [lr] if projector_lr is None or projector_lr == lr else [lr, projector_lr]
    groups = [{"params": [], "lr": x} for x in lrs]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[group_index(name, len(groups))]["params"].append(p)
    return [g for g in groups if g["params"]]


#: keys a micro-batch carries beside the model's inputs (see ``micro_batch``)
LOSS_KEYS = ("loss_weight", "global_examples", "global_tokens")


def answer_tokens(item: Encoded) -> int:
    """Tokens the loss is taken over (labels shifted by one, as the model predicts the next)."""
    return sum(1 for t in item.labels[1:] if t != IGNORE)


def micro_batch(items: list[Encoded], weights: list[float], batch: list[Encoded], pad_id: int) -> dict:
    """Collate ``items`` (part of the global ``batch``) with what the loss needs of the whole batch."""
    out = collate(items, pad_id)
    out["loss_weight"] = torch.tensor(weights, dtype=torch.float32)
    out["global_examples"] = torch.tensor(float(len(batch)))
    out["global_tokens"] = torch.tensor(float(max(1, sum(answer_tokens(e) for e in batch))))
    return out


class LlavaModule(L.LightningModule):
    def __init__(self, model, optim: OptimConfig, total_steps: int, start_step: int = 0,
                 adam_state: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``start_step`` and ``adam_state`` (parameter name -> (exp_avg, exp_avg_sq)) resume a run
        from a checkpoint: the schedule continues at ``start_step`` and Adam from those moments.
        ``total_steps``, ``lrs`` and ``losses`` count optimizer steps (global batches)."""
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = total_steps
        self.start_step = start_step
        self.adam_state = adam_state
        # names before any strategy wraps the model (FSDP's gathered states use these)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # the learning rates of the steps before start_step, exactly as the scheduler gave them
        self.lrs: list[float] = [optim.lr * lr_factor(s, total_steps, optim.warmup_ratio, optim.scheduler)
                                 for s in range(start_step)]
        self.losses: list[float] = []
        self._step_loss = torch.zeros(())

    def loss_share(self, batch: dict) -> torch.Tensor:
        """This micro-batch's share of its global batch's mean loss (zero-weight rows pad a short
        last batch so that every rank still runs the same number of micro-batches)."""
        inputs = {k: v for k, v in batch.items() if k not in LOSS_KEYS and k != "labels"}
        logits = self.model(**inputs).logits
        weight = batch["loss_weight"]
        if self.optim.loss == "token_mean":
            return (weight * token_losses(logits, batch["labels"])[0]).sum() / batch["global_tokens"]
        return (weight * per_example_loss(logits, batch["labels"])).sum() / batch["global_examples"]

    def training_step(self, batch, batch_idx):
        accumulate = self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # the first micro-batch of an optimizer step
            self.lrs.append(self.optimizers().param_groups[0]["lr"])
            self.log("train/lr", self.lrs[-1], prog_bar=True, on_step=True, batch_size=1)
            self._step_loss = torch.zeros((), device=batch["input_ids"].device)
        share = self.loss_share(batch)
        self._step_loss = self._step_loss + share.detach()
        if (batch_idx + 1) % accumulate == 0:
            loss = self.trainer.strategy.reduce(self._step_loss, reduce_op="sum")  # the global batch's loss
            self.losses.append(float(loss))
            self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        # Lightning divides by `accumulate` and DDP/FSDP average over ranks: undo both, so the
        # summed gradient is the gradient of the global batch's loss
        return share * (accumulate * self.trainer.world_size)

    def configure_optimizers(self):
        params = param_groups(self.model, self.optim.lr, self.optim.projector_lr)
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay,
                                betas=self.optim.betas, eps=self.optim.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s + self.start_step, self.total_steps, self.optim.warmup_ratio,
                                     self.optim.scheduler))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @staticmethod
    def group_index(name: str, n_groups: int) -> int:
        return group_index(name, n_groups)

    def on_train_start(self):
        # after the strategy has set the optimizer up (FSDP: over its shards)
        if self.adam_state is not None:
            parallel.load_adam_state(self.trainer, self, self.adam_state, self.start_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        parallel.clip_gradients(self.trainer, self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def even_split(seq: list, parts: int) -> list[list]:
    """``parts`` consecutive slices, sizes differing by at most one (some empty if seq is short)."""
    q, r = divmod(len(seq), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [seq[bounds[i]:bounds[i + 1]] for i in range(parts)]


class ShuffledBatches(torch.utils.data.IterableDataset):
    """Epochs over pre-encoded examples, reshuffled each epoch from a seed, in global batches of
    ``batch_size``; yields this rank's micro-batches of each.

    The global batches depend on the seed alone. Each is cut into ``world_size x accumulate``
    consecutive micro-batches (``accumulation``: from ``micro_batch_size``) and rank r takes
    micro-batches r*accumulate .. (r+1)*accumulate-1. A short last batch leaves some slices empty:
    they get one zero-weight row, so every rank runs the same number of micro-batches."""

    def __init__(self, items: list[Encoded], batch_size: int, epochs: int, seed: int, pad_id: int,
                 start_epoch: int = 0, micro_batch_size: int | None = None, world_size: int = 1):
        self.items, self.batch_size, self.epochs, self.seed, self.pad_id = items, batch_size, epochs, seed, pad_id
        self.start_epoch = start_epoch  # resuming: the epochs before it are not replayed
        self.world_size = world_size
        self.micro_batch_size, self.accumulate = accumulation(batch_size, world_size, micro_batch_size)

    @property
    def steps(self) -> int:
        """Optimizer steps (global batches)."""
        return (self.epochs - self.start_epoch) * math.ceil(len(self.items) / self.batch_size)

    def __len__(self) -> int:
        return self.steps * self.accumulate  # micro-batches on each rank

    def global_batches(self) -> Iterator[list[int]]:
        for epoch in range(self.start_epoch, self.epochs):
            order = list(range(len(self.items)))
            random.Random(self.seed * 1000 + epoch).shuffle(order)
            for i in range(0, len(order), self.batch_size):
                yield order[i:i + self.batch_size]

    def __iter__(self) -> Iterator[dict]:
        return self.micro_batches(distributed.current_rank(self.world_size))

    def micro_batches(self, rank: int) -> Iterator[dict]:
        for rows in self.global_batches():
            batch = [self.items[j] for j in rows]
            slices = even_split(batch, self.world_size * self.accumulate)
            for part in slices[rank * self.accumulate:(rank + 1) * self.accumulate]:
                if part:
                    yield micro_batch(part, [1.0] * len(part), batch, self.pad_id)
                else:
                    yield micro_batch(batch[:1], [0.0], batch, self.pad_id)


class StreamedBatches(torch.utils.data.IterableDataset):
    """Batches from an endless record stream (records carry an image spec in '_spec'); one process."""

    accumulate = 1

    def __init__(self, stream, encoder: Encoder, batch_size: int, steps: int, render):
        self.stream, self.encoder, self.batch_size, self.steps, self.render = stream, encoder, batch_size, steps, render

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        from .models.tiny_llava import pixels_uint8

        for _ in range(self.steps):
            batch = []
            for _ in range(self.batch_size):
                rec = next(self.stream)
                pix = None if rec["_spec"] is None else pixels_uint8(self.render(rec["_spec"]), self.encoder.image_size)
                batch.append(self.encoder.encode(rec, True, pix))
            yield micro_batch(batch, [1.0] * len(batch), batch, self.encoder.tok.pad_token_id)


class Progress(L.Callback):
    """A log line about every tenth of the run, beside Lightning's progress bar: the job's log file
    keeps the loss curve of a long run; rank 0 only."""

    def __init__(self, label: str, total: int, every: int | None = None):
        self.label, self.total = label, total
        self.every = every or max(1, total // 10)
        self.t0 = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches or not trainer.is_global_zero:
            return
        step = len(module.losses)
        if step % self.every == 0 or step == self.total:
            recent = module.losses[-self.every:]
            log.info("%s: step %d/%d loss %.3f (%.0fs)", self.label, step, self.total, sum(recent) / len(recent),
                     time.time() - self.t0)


class GatherModel(L.Callback):
    """FSDP: gather the trained model's full state before Lightning's teardown moves the shards."""

    def __init__(self):
        self.full: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer, module):
        if parallel.is_fsdp(trainer):
            self.full = parallel.full_model_state(trainer)


class StepBar(TQDMProgressBar):
    """Lightning's bar, named after the run (not "Epoch 0": every run here is one pass over a
    planned stream of steps), with the loss and learning rate but not the logger's version."""

    def __init__(self, label: str, **kwargs):
        super().__init__(**kwargs)
        self.label = label

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.label)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def make_trainer(trainer_cfg=None, max_steps: int = -1, logger=False, callbacks=None,
                 grad_clip: float = 0.0, accumulate: int = 1, model=None, log_every: int = 50,
                 label: str = "train") -> L.Trainer:
    """``max_steps`` counts optimizer steps, each of ``accumulate`` micro-batches per rank;
    ``model``: the model FSDP is to wrap (its layers are the FSDP units); ``logger``: Lightning's
    (``tracking.lightning_logger``: W&B) or False, written every ``log_every`` steps."""
    tc = trainer_cfg
    distributed.check_launch(distributed.world_size(tc))
    callbacks = list(callbacks or [])
    precision = getattr(tc, "precision", "32-true")
    if precision in ("32-true", "32") and model is not None and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        precision = "bf16-mixed"  # fp32 trainable weights on a bf16 base (trainable_in_fp32) meet under autocast
    bar = bool(getattr(tc, "progress_bar", True))
    if bar:  # about 200 refreshes a run: a log file stays small
        callbacks.append(StepBar(label, refresh_rate=max(1, max_steps * accumulate // 200)))
    return L.Trainer(
        accelerator=getattr(tc, "accelerator", "cpu"), devices=getattr(tc, "devices", 1),
        num_nodes=getattr(tc, "num_nodes", 1), strategy=parallel.strategy(tc, model),
        precision=precision, max_steps=max_steps, max_epochs=1,
        accumulate_grad_batches=accumulate, use_distributed_sampler=False,  # ShuffledBatches shards itself
        logger=logger, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=bar, enable_model_summary=False, gradient_clip_val=grad_clip or None,
        num_sanity_val_steps=0, log_every_n_steps=log_every)


def trainable_in_fp32(model) -> int:
    """Every trainable parameter as float32 (so AdamW keeps fp32 master weights and fp32 moments),
    the frozen base as loaded: a bf16 projector at lr 2e-5 would lose most of each update to bf16
    rounding. A bf16 base then runs under bf16 autocast (``trainer.precision=bf16-mixed``). Returns
    how many parameters were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def fit(model, batches: torch.utils.data.IterableDataset, optim: OptimConfig, trainer_cfg=None,
        logger=False, label: str = "train", log_every: int = 50) -> LlavaModule:
    """Train ``model`` in place on ``batches``; returns the module (losses and lrs per step). Under
    FSDP only rank 0's ``model`` holds the trained weights afterwards (the others are empty).
    Trainable weights are kept in float32 (:func:`trainable_in_fp32`)."""
    trainable_in_fp32(model)
    steps = batches.steps
    module = LlavaModule(model, optim, steps)
    gather = GatherModel()
    trainer = make_trainer(trainer_cfg, steps, logger, callbacks=[Progress(label, steps), gather],
                           grad_clip=optim.grad_clip, accumulate=batches.accumulate, model=model, log_every=log_every,
                           label=label)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)
    model.train()
    trainer.fit(module, loader)
    if gather.full is not None:
        parallel.unshard(module, gather.full)
    model.zero_grad(set_to_none=True)  # Lightning leaves the last step's gradients on the weights
    model.eval()
    return module


def batches_for(items: list[Encoded], batch_size: int, epochs: int, seed: int, pad_id: int, trainer_cfg=None,
                start_epoch: int = 0) -> ShuffledBatches:
    """``ShuffledBatches`` split for the configured devices and micro-batch size."""
    return ShuffledBatches(items, batch_size, epochs, seed, pad_id, start_epoch,
                           micro_batch_size=getattr(trainer_cfg, "micro_batch_size", None),
                           world_size=distributed.world_size(trainer_cfg))
