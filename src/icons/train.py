"""Training shells: a LightningModule that fine-tunes a LLaVA on LLaVA-format records.

Used for the stage-1 base (all parameters, streamed data), for training on a selected subset
(``mode=full``: projector + language model, vision tower frozen, the LLaVA stage-2 recipe; or
``mode=lora``), and for the ICONS warmup (LoRA). The learning rate of every step is recorded
(the warmup's checkpoints need their average learning rate).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch

from .data.encode import Encoded, Encoder, collate


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


def set_trainable(model, mode: str) -> None:
    """'all': every weight (stage-1 base); 'full': projector + language model (vision frozen);
    'lora': only LoRA weights (peft already froze the rest)."""
    if mode == "lora":
        return
    for name, p in model.named_parameters():
        p.requires_grad = mode == "all" or "vision_tower" not in name


class LlavaModule(L.LightningModule):
    def __init__(self, model, optim: OptimConfig, total_steps: int, start_step: int = 0,
                 adam_state: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``start_step`` and ``adam_state`` (parameter name -> (exp_avg, exp_avg_sq)) resume a run
        from a checkpoint: the schedule continues at ``start_step`` and Adam from those moments."""
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = total_steps
        self.start_step = start_step
        self.adam_state = adam_state
        # the learning rates of the steps before start_step, exactly as the scheduler gave them
        self.lrs: list[float] = [optim.lr * lr_factor(s, total_steps, optim.warmup_ratio, optim.scheduler)
                                 for s in range(start_step)]
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.optim.loss == "token_mean":
            loss = self.model(**batch).loss
        else:
            from .features.grads import per_example_loss

            labels = batch["labels"]
            logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = per_example_loss(logits, labels).mean()
        self.losses.append(float(loss.detach()))
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        self.log("train/loss", loss, prog_bar=False, on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay,
                                betas=self.optim.betas, eps=self.optim.eps)
        if self.adam_state is not None:
            names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
            for p in params:
                m, v = self.adam_state[names[id(p)]]
                opt.state[p] = {"step": torch.tensor(float(self.start_step)), "exp_avg": m.clone(),
                                "exp_avg_sq": v.clone()}
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s + self.start_step, self.total_steps, self.optim.warmup_ratio,
                                     self.optim.scheduler))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ShuffledBatches(torch.utils.data.IterableDataset):
    """Epochs over pre-encoded examples, reshuffled each epoch from a seed, batches collated."""

    def __init__(self, items: list[Encoded], batch_size: int, epochs: int, seed: int, pad_id: int,
                 start_epoch: int = 0):
        self.items, self.batch_size, self.epochs, self.seed, self.pad_id = items, batch_size, epochs, seed, pad_id
        self.start_epoch = start_epoch  # resuming: the epochs before it are not replayed

    def __len__(self) -> int:
        return (self.epochs - self.start_epoch) * math.ceil(len(self.items) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for epoch in range(self.start_epoch, self.epochs):
            order = list(range(len(self.items)))
            random.Random(self.seed * 1000 + epoch).shuffle(order)
            for i in range(0, len(order), self.batch_size):
                yield collate([self.items[j] for j in order[i:i + self.batch_size]], self.pad_id)


class StreamedBatches(torch.utils.data.IterableDataset):
    """Batches from an endless record stream (records carry an image spec in '_spec')."""

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
            yield collate(batch, self.encoder.tok.pad_token_id)


class Progress(L.Callback):
    """One line about every tenth of the run (long CPU runs should not be silent)."""

    def __init__(self, label: str, total: int, every: int | None = None):
        self.label, self.total = label, total
        self.every = every or max(1, total // 10)
        self.t0 = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = len(module.losses)
        if step % self.every == 0 or step == self.total:
            recent = module.losses[-self.every:]
            print(f"[icons] {self.label}: step {step}/{self.total} loss {sum(recent) / len(recent):.3f} "
                  f"({time.time() - self.t0:.0f}s)", flush=True)


def make_trainer(trainer_cfg=None, max_steps: int = -1, logger=False, callbacks=None,
                 grad_clip: float = 0.0) -> L.Trainer:
    tc = trainer_cfg
    return L.Trainer(
        accelerator=getattr(tc, "accelerator", "cpu"), devices=getattr(tc, "devices", 1),
        num_nodes=getattr(tc, "num_nodes", 1), strategy=getattr(tc, "strategy", "auto"),
        precision=getattr(tc, "precision", "32-true"), max_steps=max_steps, max_epochs=1,
        logger=logger, callbacks=callbacks or [], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=grad_clip or None,
        num_sanity_val_steps=0, log_every_n_steps=50)


def fit(model, batches: torch.utils.data.IterableDataset, optim: OptimConfig, trainer_cfg=None,
        logger=False, label: str = "train") -> LlavaModule:
    """Train ``model`` in place on ``batches``; returns the module (losses and lrs per step)."""
    steps = len(batches)
    module = LlavaModule(model, optim, steps)
    trainer = make_trainer(trainer_cfg, steps, logger, callbacks=[Progress(label, steps)], grad_clip=optim.grad_clip)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)
    model.train()
    trainer.fit(module, loader)
    model.eval()
    return module
