"""Gradient checkpointing (model.gradient_checkpointing): the same loss, LoRA gradients and
per-example features with it on and off, and far fewer saved activations. Tiny model, CPU."""
from __future__ import annotations

import numpy as np
import torch

from icons.data.encode import Encoder, collate
from icons.features.extract import extract
from icons.features.grads import PerExampleGrads, per_example_loss
from icons.features.store import load_group_scores
from icons.models.loading import set_gradient_checkpointing

from .test_features import POOL, VAL
from .tiny_lora import LORA, random_moments, tiny_lora_model


def _batch(tok):
    enc = Encoder(tok, 16, 32, 160)
    return collate([enc.encode(r) for r in POOL[:4]], tok.pad_token_id)


def _step(model, batch):
    """(per-example losses, LoRA grads by name, saved-for-backward bytes) of one forward/backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = per_example_loss(model(**inputs).logits, batch["labels"])
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads, sum(saved)


def test_checkpointing_keeps_loss_and_gradients_and_saves_far_less():
    tok, model = tiny_lora_model(LORA)
    batch = _batch(tok)
    model.train()
    loss_off, grads_off, bytes_off = _step(model, batch)
    set_gradient_checkpointing(model, True)
    loss_on, grads_on, bytes_on = _step(model, batch)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for n in grads_off:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-5, atol=1e-7)
    assert bytes_on * 3 < bytes_off, (bytes_on, bytes_off)  # the decoder layers' activations are not kept


def test_per_example_hooks_see_each_lora_input_once_under_checkpointing():
    tok, model = tiny_lora_model(LORA)
    batch = _batch(tok)
    model.train()
    with PerExampleGrads(model) as pe:
        off, _ = pe(batch)
    set_gradient_checkpointing(model, True)
    calls = {}
    with PerExampleGrads(model) as pe:
        real = pe._forward_hook

        def counting(name):
            hook = real(name)

            def wrapped(module, inputs, output):
                calls[name] = calls.get(name, 0) + 1
                return hook(module, inputs, output)
            return wrapped

        for h in pe._handles:
            h.remove()
        pe._handles = [m.register_forward_hook(counting(n)) for n, m in pe._modules.items()]
        on, _ = pe(batch)
    # the recomputation runs each LoRA matrix's forward again; its gradient is still taken once
    assert set(calls.values()) == {2}
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)


def test_checkpointed_extraction_gives_the_same_scores(tmp_path, monkeypatch):
    from icons.features import extract as extract_mod

    tok, model = tiny_lora_model(LORA)
    moments = random_moments(model)
    enc = Encoder(tok, 16, 32, 160)
    extract(model, enc, POOL, VAL, tmp_path / "off", moments, "none", 0, 0, batch_size=3)
    modes = []
    real = extract_mod.GradientSteps.predict_step
    monkeypatch.setattr(extract_mod.GradientSteps, "predict_step",
                        lambda self, batch, i=0: modes.append(self.model.training) or real(self, batch, i))
    extract(model, enc, POOL, VAL, tmp_path / "on", moments, "none", 0, 0, batch_size=3, checkpointing=True)
    assert modes and all(modes)  # HF checkpoints layers in training mode only
    np.testing.assert_allclose(load_group_scores(tmp_path / "on")[0], load_group_scores(tmp_path / "off")[0],
                               rtol=1e-5, atol=1e-7)
    assert not model.training
