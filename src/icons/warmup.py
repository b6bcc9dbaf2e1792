"""Step 1 of ICONS (from LESS): LoRA warmup on a small random subset of the pool.

Saves one checkpoint per epoch: the LoRA weights, the Adam moments (exp_avg, exp_avg_sq) of every
LoRA weight, and the average learning rate over the epoch (checkpoint weights for the scores).

Crash safety: a checkpoint is written into a hidden ``.checkpoint-<e>.partial`` directory and
renamed to ``checkpoint-<e>`` only when all its files are there, so a ``checkpoint-*`` directory is
always whole. An interrupted warmup (no stage manifest) resumes from its last whole checkpoint:
LoRA weights, Adam moments and step, the schedule's position and the epoch's data order (seeded
per epoch) are all restored, so the result is byte-identical to an uninterrupted run
(tests/test_crash_resume.py). Partial directories are removed first.

Data parallel (``trainer=ddp|fsdp``, ``parallel.py``): ``batch_size`` is the global batch; every
rank takes part in gathering a checkpoint's full tensors, rank 0 alone writes it, and the others
wait for it, so a resumed run (on any number of processes) finds it whole.
"""
from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from . import parallel
from .data.encode import LazyEncoded
from .distributed import barrier, is_main_process
from .io import read_json, slow_point, write_json
from .train import LlavaModule, OptimConfig, Progress, batches_for, make_trainer

log = logging.getLogger(__name__)


def warmup_rows(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of the pool's ``n`` rows, in pool order (rows, not ids: ids
    may repeat)."""
    k = max(1, int(round(fraction * n)))
    return sorted(random.Random(seed).sample(range(n), k))


class EpochCheckpoints(L.Callback):
    """A checkpoint at the end of every epoch and at ``stop`` (an early stop: its last one)."""

    def __init__(self, out_dir: Path, steps_per_epoch: int, stop: int | None = None):
        self.out_dir, self.steps_per_epoch, self.stop = out_dir, steps_per_epoch, stop
        self.saved: list[dict] = []

    def on_train_batch_end(self, trainer, module: LlavaModule, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an optimizer step
        step = len(module.lrs)
        if step % self.steps_per_epoch and step not in (module.total_steps, self.stop):
            return
        epoch = math.ceil(step / self.steps_per_epoch)
        state = parallel.trainable_state(trainer, module)  # every rank: FSDP gathers to rank 0
        span = module.lrs[(epoch - 1) * self.steps_per_epoch:step]
        opt = trainer.optimizers[0]
        info = {"epoch": epoch, "step": step, "avg_lr": sum(span) / len(span),
                "betas": list(opt.param_groups[0]["betas"]), "eps": opt.param_groups[0]["eps"]}
        if trainer.is_global_zero:
            self.write(epoch, state, info)
        trainer.strategy.barrier()  # the other ranks go on once the checkpoint is whole
        self.saved.append(info)
        slow_point("warmup")

    def write(self, epoch: int, state: dict, info: dict) -> None:
        final = self.out_dir / f"checkpoint-{epoch}"
        ckpt = self.out_dir / f".checkpoint-{epoch}.partial"
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
        save_file({n: w for n, (w, _, _) in state.items()}, str(ckpt / "lora.safetensors"))
        save_file({**{f"m::{n}": m for n, (_, m, _) in state.items()}, **{f"v::{n}": v for n, (_, _, v) in state.items()}},
                  str(ckpt / "adam.safetensors"))
        write_json(ckpt / "checkpoint.json", info)
        if final.exists():
            shutil.rmtree(final)
        ckpt.rename(final)  # whole or absent


def stop_step(epochs: int, steps_per_epoch: int, stop_after: float | None) -> int:
    """The last step of a warmup: all of them, or ``stop_after`` of them (at least one)."""
    total = epochs * steps_per_epoch
    return total if stop_after is None else min(total, max(1, math.ceil(stop_after * total)))


def run_warmup(model, encoder, records: list[dict], out_dir: Path, epochs: int, batch_size: int, lr: float,
               seed: int, trainer_cfg=None, logger=False, stop_after: float | None = None) -> list[dict]:
    """LoRA-train ``model`` (a peft model) on ``records``; returns the checkpoints' info.

    ``stop_after``: stop after that share of the run's steps (its schedule unchanged) and keep the
    checkpoint there: the released ICONS code takes ``checkpoint-500`` of a LoRA run over the
    whole pool, early and near the peak learning rate. Resumes after the last whole
    ``checkpoint-<e>`` an interrupted earlier run left in ``out_dir`` (``model`` must hold the LoRA
    initialisation that run started from: it is overwritten)."""
    if is_main_process():
        for d in out_dir.glob(".checkpoint-*.partial") if out_dir.exists() else []:
            shutil.rmtree(d)
    barrier()
    items = LazyEncoded(records, encoder)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    stop = stop_step(epochs, steps_per_epoch, stop_after)
    done = finished_epochs(out_dir, epochs, steps_per_epoch, stop)
    saved, start_epoch, adam_state = [], len(done), None
    for ckpt in done:
        saved.append(read_json(ckpt / "checkpoint.json"))
    if done:
        m, v, _ = load_checkpoint(model, done[-1])
        adam_state = {n: (m[n], v[n]) for n in m}
        log.info("warmup: resuming after epoch %d of %d (%s)", start_epoch, epochs, done[-1])
    optim = OptimConfig(lr=lr, warmup_ratio=0.03, scheduler="linear", weight_decay=0.0)
    batches = batches_for(items, batch_size, epochs, seed, encoder.tok.pad_token_id, trainer_cfg, start_epoch)
    steps = min(batches.steps, stop - start_epoch * steps_per_epoch)
    if steps <= 0:
        return saved
    module = LlavaModule(model, optim, epochs * steps_per_epoch, start_epoch * steps_per_epoch, adam_state)
    cb = EpochCheckpoints(out_dir, steps_per_epoch, stop)
    cb.saved = saved
    trainer = make_trainer(trainer_cfg, steps, logger=logger, callbacks=[cb, Progress("warmup", steps)],
                           grad_clip=1.0, accumulate=batches.accumulate, model=model, label="warmup")
    torch.manual_seed(seed)
    model.train()
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    model.eval()
    return cb.saved


def finished_epochs(out_dir: Path, epochs: int, steps_per_epoch: int, stop: int | None = None) -> list[Path]:
    """The whole checkpoints 1..e of an earlier, interrupted run (stopping at the first gap)."""
    stop = stop or epochs * steps_per_epoch
    done = []
    for e in range(1, math.ceil(stop / steps_per_epoch) + 1):
        ckpt = out_dir / f"checkpoint-{e}"
        if not (ckpt / "checkpoint.json").exists():
            break
        if read_json(ckpt / "checkpoint.json").get("step") != min(e * steps_per_epoch, stop):
            raise ValueError(f"{ckpt}: made with another number of steps per epoch; delete {out_dir} to restart")
        done.append(ckpt)
    return done


def load_checkpoint(model, ckpt: Path) -> tuple[dict, dict, dict]:
    """Load LoRA weights into ``model``; return (m, v, info) with moments keyed by parameter name."""
    weights = load_file(str(ckpt / "lora.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(f"{ckpt}: LoRA weights do not match the model: {sorted(missing)[:3]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    adam = load_file(str(ckpt / "adam.safetensors"))
    m = {k[3:]: t for k, t in adam.items() if k.startswith("m::")}
    v = {k[3:]: t for k, t in adam.items() if k.startswith("v::")}
    return m, v, read_json(ckpt / "checkpoint.json")
