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
    """The encoder builds the same ids and pixels as the HF LlavaProcessor saved with the model
    (its chat template writes <s>, as the tokenizer does not add it)."""
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
    assert out["input_ids"][0].tolist() == e.input_ids
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
    from icons.models.loading import base_recipe, resolve_base

    cfg = compose_cfg()
    assert json.loads((ASSET / "icons_base.json").read_text())["recipe"] == base_recipe(cfg)
    assert resolve_base(cfg) == ASSET
    model, tok = tiny_llava.load(ASSET)
    assert model.config.text_config.num_hidden_layers == cfg.model.text_layers
    assert tok.convert_tokens_to_ids("unanswerable") != tok.unk_token_id


def test_probe_reads_what_the_shipped_base_knows():
    """The diagnostic probe (teacher-forced) on the shipped base: it sees colours and positions,
    copies counts from a text context (measured 89-100%) and picks the letter of a looked-up
    answer among two (75%, chance 50); a shifted label or a broken image path would put these
    near chance."""
    from icons.models.base import ASSET
    from icons.models.probe import probe

    model, tok = tiny_llava.load(ASSET)
    acc = probe(model, tok, n=60)
    assert acc["caption_color"] >= 80 and acc["caption_position"] >= 90
    assert acc["choice_2"] >= 65 and acc["lookup_position"] >= 80
    assert acc["context_count"] >= 90 and acc["context_number"] >= 90
    assert set(acc) >= {"caption_shape", "caption_digit", "context_color", "context_exist",
                        "choice_2", "choice_3", "choice_4"}
    assert acc["lookup_shape"] > 35  # chance 25: the words scored are the right ones (next test)


def test_choice_items_letter_names_the_answer_of_the_question():
    """The probe's choice items (stage-1's "choice" task): the letter answered is the one whose
    candidate is the question's answer, and the item's label counts the candidates."""
    import random

    from icons.data.mini_llava.pretraining import _any_qa, choice_example
    from icons.data.mini_llava.scenes import sample_scene, sample_sign
    from icons.models.base import ASSET
    from icons.models.probe import choice_items

    for i in range(100):
        spec = sample_scene(random.Random(i)) if i % 4 else sample_sign(random.Random(i), "eval")
        human, gpt = choice_example(random.Random(1000 + i), spec)
        qa = _any_qa(random.Random(1000 + i), spec)  # the same draws: the question asked
        cands = dict(c.split(" = ") for c in human["value"].split(" Candidates : ")[1].split(" . Give")[0].split(" ; "))
        assert qa.question in human["value"] and cands[gpt["value"]] == qa.answer
    _, tok = tiny_llava.load(ASSET)
    enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 256)
    items = choice_items(enc, 60, random.Random(0))
    for label, item in items:
        prompt = tok.decode([t for t, lab in zip(item.input_ids, item.labels) if lab == IGNORE])
        assert label == f"choice_{prompt.count(' = ')}"
    assert {label for label, _ in items} == {"choice_2", "choice_3", "choice_4"}


def test_probe_lookup_scores_exactly_the_words_fixed_by_the_caption_so_far():
    """lookup_item scores the shape after "A <size> <colour>" and the cell after the full name,
    only where those earlier words name one object: checked against the caption's own words."""
    import random

    from icons.data.mini_llava.scenes import CELLS, SHAPES
    from icons.models.base import ASSET
    from icons.models.probe import lookup_item

    _, tok = tiny_llava.load(ASSET)
    enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 256)
    rng = random.Random(3)
    kinds = {"shape": 0, "position": 0}
    for _ in range(60):
        item, scored = lookup_item(enc, rng)
        words = tok.convert_ids_to_tokens([t for t in item.labels if t != IGNORE])
        objects = " ".join(words).split(" . A ")[1:]  # "small red circle at the top left"
        names = [o.split(" at ")[0].split() for o in objects]
        for kind, at in scored:
            kinds[kind] += 1
            if kind == "shape":
                size_colour = words[at[0] - 2:at[0]]
                assert words[at[0]] in SHAPES and sum(n[:2] == size_colour for n in names) == 1
            else:
                name = words[at[0] - 5:at[0] - 2]  # "<size> <colour> <shape> at the <cell>"
                assert " ".join(words[j] for j in at) in CELLS and words[at[0] - 2:at[0]] == ["at", "the"]
                assert sum(n == name for n in names) == 1
        assert len(scored) >= 1
    assert kinds["shape"] > 60 and kinds["position"] > 60


@pytest.mark.parametrize("projector_lr", [None, 1e-2])
def test_lora_training_trains_the_projector_only_with_its_own_lr(tok, projector_lr):
    """LLaVA-1.5's LoRA recipe trains the projector beside the LoRA weights at its own lr
    (--mm_projector_lr); without projector_lr the projector stays frozen."""
    from types import SimpleNamespace

    from icons.models.lora import add_lora
    from icons.train import PROJECTOR, LlavaModule

    torch.manual_seed(0)
    model = add_lora(tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32),
                     SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    set_trainable(model, "lora", projector=projector_lr is not None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0, scheduler="constant", projector_lr=projector_lr)
    groups = LlavaModule(model, optim, 1).configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == ([3e-3] if projector_lr is None else [3e-3, projector_lr])
    rec = {"id": "0", "image": "-", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the sign ?"}, {"from": "gpt", "value": "red"}]}
    px = np.full((32, 32, 3), 200, np.uint8)
    items = [Encoder(tok, 16, 32, 160).encode(rec, pixels=px)] * 4
    fit(model, ShuffledBatches(items, 4, 2, 0, tok.pad_token_id), optim)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)
    assert any(PROJECTOR in n for n in changed) == (projector_lr is not None)
    assert all("lora_" in n or PROJECTOR in n for n in changed), sorted(changed)[:3]


def test_lazy_encoding_decodes_images_only_when_asked_and_checks_lengths_up_front(tok, tmp_path):
    """Training sets are encoded batch by batch (a real subset's pixels do not fit in memory);
    a record that cannot be encoded still stops the run before training."""
    from icons.data.encode import LazyEncoded

    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "x.png")
    records = [_record("x.png"), {**_record(), "id": "r2"}, {**_record("x.png"), "id": "r3"}]
    records[1]["conversations"][-1]["value"] = " ".join(["red"] * 200)  # cut at max_length
    enc = Encoder(tok, 16, 32, 160, tmp_path)
    decoded = []
    load = enc.load_image
    enc.load_image = lambda r: (decoded.append(r["id"]) if r.get("image") else None) or load(r)
    items = LazyEncoded(records, enc)
    assert decoded == [] and len(items) == 3 and items.truncated == 1
    eager = [Encoder(tok, 16, 32, 160, tmp_path).encode(r) for r in records]
    for lazy, ref in zip([items[i] for i in range(3)], eager):
        assert lazy.input_ids == ref.input_ids and lazy.labels == ref.labels and lazy.truncated == ref.truncated
        assert (lazy.pixels is None) == (ref.pixels is None)
        assert lazy.pixels is None or np.array_equal(lazy.pixels, ref.pixels)
    assert decoded == ["r1", "r3"]
    with pytest.raises(ValueError, match="'r1'.*longer than max_length"):
        LazyEncoded([_record("x.png")], Encoder(tok, 16, 32, 12, tmp_path))
