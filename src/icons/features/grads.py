"""Per-example gradients of the LoRA weights, for a whole batch from one backward pass.

The loss of one example is the mean cross-entropy over its *own* answer tokens. Summing these
per-example losses over the batch and back-propagating once gives, at every LoRA linear layer,
the output gradient of each example separately (examples do not interact in a forward pass), so
the per-example weight gradient is ``einsum('bto,bti->boi', grad_output, input)`` over that
example's tokens. Padding contributes nothing: its output gradient is zero.
Hooks read the inputs and output gradients of peft's ``lora_A``/``lora_B`` linear layers, so the
scaling peft applies (alpha / r) is already in the chain rule.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable LoRA weights in a fixed order (the order of every feature vector)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params or not all("lora_" in n for n, _ in params):
        raise ValueError("expected a peft model whose only trainable parameters are LoRA weights")
    return params


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed next-token cross-entropy over each example's answer tokens, and (B,) their count."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                          reduction="none").view(target.shape)
    return tok.sum(1), (target != -100).sum(1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy over each example's own answer tokens."""
    total, n = token_losses(logits, labels)
    if (n == 0).any():
        raise ValueError("an example has no answer tokens (nothing to take a gradient of)")
    return total / n


class PerExampleGrads:
    """Context manager: ``grads(batch) -> (B, D)`` flattened per-example LoRA gradients, or,
    without ever forming that, ``blocks, losses = grads.stream(batch)`` with ``blocks`` yielding
    ``(name, (B, out, in))`` one LoRA matrix at a time."""

    def __init__(self, model):
        self.model = model
        self.params = lora_parameters(model)
        self.names = [n for n, _ in self.params]
        self.dim = sum(p.numel() for _, p in self.params)
        self._modules = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(f"{name}.weight" == n for n in self.names):
                self._modules[f"{name}.weight"] = module
        missing = set(self.names) - set(self._modules)
        if missing:
            raise ValueError(f"LoRA parameters not held by a Linear layer: {sorted(missing)[:3]}")
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name):
        def hook(module, inputs, output):
            self._inputs[name] = inputs[0].detach()
            output.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))
        return hook

    def backward(self, batch: dict) -> torch.Tensor:
        """One batched forward and backward; keeps each LoRA matrix's input and output gradient
        for ``blocks``. Returns the per-example losses (B,)."""
        self._inputs.clear()
        self._grads.clear()
        device = next(self.model.parameters()).device  # batches are collated on the CPU
        labels = batch["labels"].to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.enable_grad():
            out = self.model(**inputs)
            losses = per_example_loss(out.logits, labels)
            losses.sum().backward()
        self.model.zero_grad(set_to_none=True)
        return losses.detach()

    def blocks(self, release: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Per-matrix per-example gradients ``(name, (B, out, in))`` of the last ``backward``, in
        ``names`` order, each formed only when asked for: the kept input and output gradient of a
        matrix are released once its block is made, so at most one (B, out, in) block exists at a
        time (plus whatever the caller keeps) and the whole-model (B, D) gradient never does.
        ``release=False`` keeps them, for a second sweep over the same backward."""
        missing = [n for n in self.names if n not in self._grads]
        if missing:
            raise RuntimeError(f"no output gradient captured for {missing[:3]} (call backward(batch) first; "
                               f"each backward's blocks can be read once)")
        for name in self.names:
            if release:
                g, x = self._grads.pop(name), self._inputs.pop(name)
            else:
                g, x = self._grads[name], self._inputs[name]
            yield name, torch.einsum("bto,bti->boi", g.float(), x.float())
        if release:
            self._inputs.clear()

    def stream(self, batch: dict) -> tuple[Iterator[tuple[str, torch.Tensor]], torch.Tensor]:
        """``(blocks, losses)``: ``backward(batch)`` then a generator over its per-matrix gradients."""
        losses = self.backward(batch)
        return self.blocks(), losses

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients (B, D) and per-example losses (B,) for one batch (the whole-model
        gradient, concatenated in ``names`` order; streaming callers use ``stream`` instead)."""
        blocks, losses = self.stream(batch)
        return torch.cat([g.flatten(1) for _, g in blocks], dim=1), losses


def reference_grads(model, batch: dict) -> torch.Tensor:
    """The slow way, for tests: one example at a time through autograd."""
    params = lora_parameters(model)
    rows = []
    has_img = [bool((batch["input_ids"][i] == model.config.image_token_index).any()) for i in range(len(batch["input_ids"]))]
    img_pos = 0
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        one = {"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n]}
        if batch["attention_mask"][i, 0] == 0:  # left padded: keep the last n tokens
            one = {"input_ids": batch["input_ids"][i:i + 1, -n:], "attention_mask": batch["attention_mask"][i:i + 1, -n:]}
            lab = batch["labels"][i:i + 1, -n:]
        else:
            lab = batch["labels"][i:i + 1, :n]
        if has_img[i]:
            one["pixel_values"] = batch["pixel_values"][img_pos:img_pos + 1]
            img_pos += 1
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = per_example_loss(model(**one).logits, lab)[0]
            grads = torch.autograd.grad(loss, [p for _, p in params])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
