"""Batched per-example LoRA gradients equal a one-example-at-a-time autograd loop."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from icons.data.encode import Encoder, collate
from icons.data.mini_llava import tokenizer_corpus
from icons.features.grads import PerExampleGrads, reference_grads
from icons.models import tiny_llava
from icons.models.lora import add_lora

LORA = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0,
                         "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"})


@pytest.fixture(scope="module")
def setup():
    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    torch.manual_seed(0)
    model = tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32)
    model = add_lora(model, LORA)
    with torch.no_grad():  # LoRA B starts at zero, which would make every A gradient zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    return tok, model


def _batch(tok, texts_and_images):
    enc = Encoder(tok, 16, 32, 160)
    rng = np.random.default_rng(0)
    items = []
    for q, a, has_img in texts_and_images:
        rec = {"id": q, "conversations": [{"from": "human", "value": ("<image>\n" if has_img else "") + q},
                                          {"from": "gpt", "value": a}]}
        if has_img:
            rec["image"] = "-"
        px = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) if has_img else None
        items.append(enc.encode(rec, pixels=px))
    return collate(items, tok.pad_token_id)


MIXED = [("What color is the circle ?", "red", True),
         ("What is 3 plus 4 ?", "3 plus 4 is 7 .", False),  # text-only, longer: others get padding
         ("How many objects are there ? Answer the question using a single word or phrase .", "2", True),
         ("Describe the image in detail .", "There are 2 objects . A small red circle at the top left .", True)]


def test_batched_equals_loop_with_padding_and_text_only(setup):
    tok, model = setup
    batch = _batch(tok, MIXED)
    assert (batch["attention_mask"] == 0).any()  # padding present
    with PerExampleGrads(model) as pe:
        got, losses = pe(batch)
    ref = reference_grads(model, batch)
    assert got.shape == ref.shape and got.shape[1] == pe.dim
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 1e-5, rel


def test_gradient_checkpointing_gives_same_grads(setup):
    tok, model = setup
    batch = _batch(tok, MIXED)
    with PerExampleGrads(model) as pe:
        plain, _ = pe(batch)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()  # checkpointing is active in train mode only; dropout is 0 in this model
    try:
        with PerExampleGrads(model) as pe:
            ckpt, _ = pe(batch)
    finally:
        base.gradient_checkpointing_disable()
        model.eval()
    assert torch.allclose(plain, ckpt, rtol=1e-5, atol=1e-7)


def test_batch_composition_does_not_change_an_example(setup):
    tok, model = setup
    with PerExampleGrads(model) as pe:
        together, _ = pe(_batch(tok, MIXED))
        alone, _ = pe(_batch(tok, MIXED[:1]))
    assert torch.allclose(together[0], alone[0], rtol=1e-5, atol=1e-7)


def test_streamed_blocks_equal_the_flat_gradient(setup):
    tok, model = setup
    batch = _batch(tok, MIXED)
    with PerExampleGrads(model) as pe:
        flat, losses = pe(batch)
        blocks, losses2 = pe.stream(batch)
        got = list(blocks)
        assert [n for n, _ in got] == pe.names
        assert all(g.shape == (4, *p.shape) for (_, g), (_, p) in zip(got, pe.params))
        assert torch.equal(torch.cat([g.flatten(1) for _, g in got], 1), flat)
        assert torch.equal(losses, losses2)
        with pytest.raises(RuntimeError, match="backward"):  # blocks are released as they are read
            next(pe.blocks())
        pe.backward(batch)  # release=False: a second sweep over the same backward
        first = [g for _, g in pe.blocks(release=False)]
        second = [g for _, g in pe.blocks()]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert not pe._inputs and not pe._grads
