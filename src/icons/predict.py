"""Lightning prediction loops over planned batches: what feature extraction and evaluation run on.

Both stages go through a fixed plan of batches (length-sorted; for features also sharded over
ranks and resumed from a done mask), so the loader is a map over that plan, and the Trainer is a
one-device predictor in every process: under torchrun each rank runs its own loop over its own
batches (no Lightning launcher, no distributed sampler). Its precision is ``32-true``, which leaves
the model in the dtypes it was loaded in (a bf16 base keeps fp32 LoRA weights): autocast would
change the gradients the features are made of.

    trainer = predictor(trainer_cfg, "features", done=40, total=375)   # the bar starts at 40/375
    trainer.predict(module, loader(plan, make_batch), return_predictions=False)
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from .distributed import compute_device, is_main_process


# the store writer needs no sampler indices (each batch carries its rows): Lightning's warning that
# it cannot infer them says nothing here
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices", module="lightning")


class PlannedBatches(torch.utils.data.Dataset):
    """Batch ``k`` of a plan (a list of row-index lists), made by ``make(rows)`` when the loader
    asks for it (encoding and image decoding happen here, in the loader's workers)."""

    def __init__(self, plan: Sequence[Sequence[int]], make: Callable[[list[int]], Any]):
        self.plan, self.make = [list(b) for b in plan], make

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        return self.make(self.plan[k])


class Rows:
    """A planned batch that Lightning passes to ``predict_step`` untouched (it moves tensors to the
    device only inside containers it knows): its row indices and whatever the step needs."""

    __slots__ = ("idx", "data")

    def __init__(self, idx: list[int], data: Any):
        self.idx, self.data = idx, data


def _as_is(batch):
    return batch


def loader(plan: Sequence[Sequence[int]], make: Callable[[list[int]], Any], num_workers: int = 0):
    """The plan's batches in order (``make`` builds each; with workers, in parallel)."""
    return torch.utils.data.DataLoader(PlannedBatches(plan, make), batch_size=None, shuffle=False,
                                       num_workers=num_workers, collate_fn=_as_is)


class ResumedProgressBar(TQDMProgressBar):
    """Lightning's bar, counting the batches an earlier (interrupted) run already did: a resumed
    feature stage starts at ``done`` of ``total``."""

    def __init__(self, done: int = 0, total: int | None = None, label: str = "predict", **kwargs):
        super().__init__(**kwargs)
        self.done, self.total, self.label = done, total, label

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0 and self.predict_progress_bar is not None:
            bar = self.predict_progress_bar
            bar.total = self.total if self.total is not None else self.done + bar.total
            bar.initial = self.done
            bar.set_description(self.label)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        n = self.done + batch_idx + 1
        bar = self.predict_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()


def predictor(trainer_cfg=None, label: str = "predict", done: int = 0, total: int | None = None,
              grad: bool = False, callbacks: Sequence = ()) -> L.Trainer:
    """A one-device Lightning Trainer for a prediction loop on ``trainer.accelerator``'s device
    (``distributed.compute_device``). ``grad``: the steps take gradients (feature extraction):
    no inference mode. The progress bar shows on rank 0 when ``trainer.progress_bar`` is on."""
    device = compute_device(trainer_cfg)
    bar = bool(getattr(trainer_cfg, "progress_bar", True)) and is_main_process()
    rate = max(1, (total or 0) // 200)
    cbs = [*callbacks] + ([ResumedProgressBar(done, total, label, refresh_rate=rate)] if bar else [])
    return L.Trainer(accelerator="cpu" if device.type == "cpu" else "gpu",
                     devices=1 if device.type == "cpu" else [device.index], strategy="auto", precision="32-true",
                     logger=False, callbacks=cbs, enable_progress_bar=bar, enable_model_summary=False,
                     enable_checkpointing=False, inference_mode=not grad)
