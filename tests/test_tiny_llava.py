"""Tiny LLaVA: tokenizer, encoding and label masking, save/load, one training step."""
import numpy as np
import pytest
import torch
from PIL import Image

from icons.data.encode import IGNORE, Encoder, collate
from icons.data.mini_llava import tokenizer_corpus
from icons.models import tiny_llava
from icons.train import OptimConfig, ShuffledBatches, fit, set_trainable


@pytest.fixture(scope="module")
def tok():
    return tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32)


def _record(image_path=None):
    rec = {"id": "r1", "conversations": [
        {"from": "human", "value": ("<image>\n" if image_path else "") + "What color is the circle ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many objects are there ?"},
        {"from": "gpt", "value": "There are 3 objects ."}]}
    if image_path:
        rec["image"] = image_path
    return rec


def test_tokenizer_round_trip(tok):
    text = "Context : A red sign with the number 4 2 in white . Question : What number is written on the sign ?"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("A a", add_special_tokens=False)) == ["A", "a"]
    assert tok.image_token == "<image>"


def test_label_masking(tok, tmp_path):
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "x.png")
    enc = Encoder(tok, 16, 32, 160, tmp_path)
    e = enc.encode(_record("x.png"))
    assert e.pixels.shape == (32, 32, 3)
    assert e.input_ids.count(tok.image_token_id) == 16
    answer_tokens = [t for t, l in zip(e.input_ids, e.labels) if l != IGNORE]
    expected = tok.encode("red", add_special_tokens=False) + [tok.eos_token_id] + \
        tok.encode("There are 3 objects .", add_special_tokens=False) + [tok.eos_token_id]
    assert answer_tokens == expected
    assert all(l == t for t, l in zip(e.input_ids, e.labels) if l != IGNORE)
    prompt = enc.encode(_record("x.png"), with_answer=False)
    assert all(l == IGNORE for l in prompt.labels)
    assert prompt.input_ids[-1] == tok.convert_tokens_to_ids("ASSISTANT:")


def test_processor_matches_encoder(tok, tmp_path):
    """The fast encoder builds the same ids and pixels as the HF LlavaProcessor."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    img.save(tmp_path / "y.png")
    proc = tiny_llava.build_processor(tok)
    rec = {"id": "p", "image": "y.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle ?"}, {"from": "gpt", "value": "red"}]}
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle ?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]}])
    out = proc(images=[img], text=[text], return_tensors="pt")
    e = Encoder(tok, 16, 32, 160, tmp_path).encode(rec)
    assert out["input_ids"][0].tolist() == e.input_ids[1:]  # the encoder adds <s>
    batch = collate([e], tok.pad_token_id)
    assert torch.allclose(out["pixel_values"], batch["pixel_values"], atol=1e-6)


def test_save_load_same_logits(tok, model, tmp_path):
    enc = Encoder(tok, 16, 32, 160)
    e = enc.encode(_record(), pixels=None)
    b = collate([e], tok.pad_token_id)
    b.pop("labels")
    model.eval()
    with torch.no_grad():
        ref = model(**b).logits
    tiny_llava.save(model, tok, tmp_path / "ckpt")
    m2, tok2 = tiny_llava.load(tmp_path / "ckpt")
    with torch.no_grad():
        got = m2(**b).logits
    assert torch.equal(ref, got)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.image_token_id == tok.image_token_id


def test_smoke_training_lowers_loss(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32)
    set_trainable(model, "full")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        color = ["red", "blue"][i % 2]
        px = np.zeros((32, 32, 3), np.uint8) + (np.array([220, 40, 40]) if color == "red" else np.array([40, 40, 220])).astype(np.uint8)
        rec = {"id": str(i), "image": "-", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the sign ?"}, {"from": "gpt", "value": color}]}
        items.append(Encoder(tok, 16, 32, 160).encode(rec, pixels=px))
    before = float(model(**collate(items, tok.pad_token_id)).loss)
    fit(model, ShuffledBatches(items, 8, 10, 0, tok.pad_token_id), OptimConfig(lr=3e-3, warmup_ratio=0.0))
    after = float(model(**collate(items, tok.pad_token_id)).loss)
    assert after < 0.5 * before


def test_shipped_base_matches_the_default_config(compose_cfg):
    """The default run must find the shipped base instead of pretraining one for ~1 hour."""
    import json

    from icons.models.base import ASSET
    from icons.stages import base_recipe, resolve_base

    cfg = compose_cfg()
    assert json.loads((ASSET / "icons_base.json").read_text())["recipe"] == base_recipe(cfg)
    assert resolve_base(cfg) == ASSET
    model, tok = tiny_llava.load(ASSET)
    assert model.config.text_config.num_hidden_layers == cfg.model.text_layers
    assert tok.convert_tokens_to_ids("unanswerable") != tok.unk_token_id


def test_probe_reads_what_the_shipped_base_knows():
    """The diagnostic probe (teacher-forced) on the shipped base: it sees colours and positions
    and copies counts from a text context (each measured at 100%); a shifted label or a broken
    image path would put these near chance."""
    from icons.models.base import ASSET
    from icons.models.probe import probe

    model, tok = tiny_llava.load(ASSET)
    acc = probe(model, tok, n=60)
    assert acc["caption_color"] >= 90 and acc["caption_position"] >= 90
    assert acc["context_count"] >= 90 and acc["context_number"] >= 90
    assert set(acc) >= {"caption_shape", "caption_digit", "context_color", "context_exist"}
