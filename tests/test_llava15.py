"""LLaVA-1.5 assembly from its parts (LLM dir + CLIP tower dir + mm_projector.bin), its image
preprocessing and its conversation template, on tiny stand-ins saved in the real on-disk formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icons.config import ConfigError, validate
from icons.data.encode import IGNORE, collate
from icons.models import llava15
from icons.models.template import TEMPLATES, VICUNA_SYSTEM

VICUNA = TEMPLATES["vicuna_v1"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_WORDS = ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
                "helpful , detailed , and polite answers to the user ' s questions .").split()
CORPUS = [VICUNA_SYSTEM, "USER: ASSISTANT: What is red? blue yes or no? green a cat dog on the mat"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # like Vicuna's: bos/eos/unk, no pad and no <image>
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Tiny Vicuna-like LLM dir, CLIP vision tower dir (+ its image processor), mm_projector.bin."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("llava15_parts")
    tok = _tokenizer()
    tok.save_pretrained(root / "llm")
    torch.manual_seed(0)
    lc = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(lc).save_pretrained(root / "llm")
    # 3 layers so that layer -2 (LLaVA's) and -1 differ; 28/14 -> 4 image tokens
    vc = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2)
    CLIPVisionModel(vc).save_pretrained(root / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        root / "vision")
    g = torch.Generator().manual_seed(1)
    proj = {"model.mm_projector.0.weight": torch.randn(64, 32, generator=g) * 0.2,
            "model.mm_projector.0.bias": torch.randn(64, generator=g) * 0.2,
            "model.mm_projector.2.weight": torch.randn(64, 64, generator=g) * 0.2,
            "model.mm_projector.2.bias": torch.randn(64, generator=g) * 0.2}
    (root / "proj").mkdir()
    torch.save(proj, root / "proj" / "mm_projector.bin")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)).save(root / "img.png")
    return {"root": root, "llm": root / "llm", "vision": root / "vision", "proj": root / "proj" / "mm_projector.bin",
            "proj_sd": proj, "vocab": len(tok)}


@pytest.fixture(scope="module")
def assembled(parts):
    return llava15.assemble(parts["llm"], parts["vision"], parts["proj"], "float32")


RECORD = {"id": "r1", "image": "img.png", "conversations": [
    {"from": "human", "value": "What is red?\n<image>"}, {"from": "gpt", "value": "blue"},
    {"from": "human", "value": "yes or no?"}, {"from": "gpt", "value": "no"}]}
TEXT_RECORD = {"id": "t1", "conversations": [{"from": "human", "value": "a cat on the mat?"},
                                              {"from": "gpt", "value": "yes"}]}


def _reference(parts, image_id: int, feature_layer: int = -2):
    """A LlavaForConditionalGeneration built directly from configs, weights read from the files."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = LlamaConfig.from_pretrained(parts["llm"])
    tc.vocab_size = parts["vocab"] + 1
    cfg = LlavaConfig(vision_config=CLIPVisionConfig.from_pretrained(parts["vision"]), text_config=tc,
                      image_token_index=image_id, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    ref = LlavaForConditionalGeneration(cfg)
    sd = {}
    for k, v in load_file(parts["llm"] / "model.safetensors").items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):  # + the <image> row: the mean row
            v = torch.cat([v, v.mean(0, keepdim=True)])
        sd[k if k.startswith("lm_head") else "model.language_model." + k[len("model."):]] = v
    for k, v in load_file(parts["vision"] / "model.safetensors").items():
        sd["model.vision_tower." + k.removeprefix("vision_model.")] = v
    names = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
             "2.bias": "linear_2.bias"}
    for k, v in parts["proj_sd"].items():
        sd["model.multi_modal_projector." + names[k.removeprefix("model.mm_projector.")]] = v
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def _batch(encoder, root):
    enc = llava15.Encoder(encoder.tok, encoder.preprocess, encoder.n_image, 256, root)
    items = [enc.encode(RECORD), enc.encode(TEXT_RECORD)]
    return collate(items, encoder.tok.pad_token_id)


def _encoder(assembled, root=None, max_length=256):
    model, tok, pre = assembled
    return llava15.Encoder(tok, pre, llava15.n_image_tokens(model.config.vision_config), max_length, root)


# ---------------------------------------------------------------- assembly
def test_assembled_logits_equal_a_directly_built_llava(parts, assembled):
    model, tok, _ = assembled
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") == parts["vocab"]
    assert tok.pad_token == tok.unk_token  # LLaVA's v1 choice
    assert cfg.image_seq_length == 4
    batch = _batch(_encoder(assembled), parts["root"])
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    ref = _reference(parts, cfg.image_token_id)
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        want = ref(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # the comparison sees the vision path: LLaVA's layer -2 is not the last layer
        other = _reference(parts, cfg.image_token_id, feature_layer=-1)(
            **{k: v for k, v in batch.items() if k != "labels"}).logits
    assert got.shape == (2, batch["input_ids"].shape[1], parts["vocab"] + 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], other[0], atol=1e-4)
    torch.testing.assert_close(got[1], other[1], rtol=1e-5, atol=1e-5)  # the text-only row has no image


def test_assembled_weights_are_the_files(parts, assembled):
    from safetensors.torch import load_file

    model = assembled[0]
    llm = load_file(parts["llm"] / "model.safetensors")
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[: parts["vocab"]], llm["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(emb[parts["vocab"]], llm["model.embed_tokens.weight"].mean(0), rtol=0, atol=1e-7)
    p = model.model.multi_modal_projector
    torch.testing.assert_close(p.linear_2.bias, parts["proj_sd"]["model.mm_projector.2.bias"], rtol=0, atol=0)
    torch.testing.assert_close(p.linear_1.weight, parts["proj_sd"]["model.mm_projector.0.weight"], rtol=0, atol=0)


def test_assemble_dtype(parts, assembled):
    model, tok, pre = llava15.assemble(parts["llm"], parts["vision"], parts["proj"], "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = _batch(_encoder((model, tok, pre)), parts["root"])  # float32 pixels into a bf16 model
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        want = assembled[0](**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.1 * want.abs().max()


def test_vision_tower_from_a_full_clip_checkpoint(parts, tmp_path):
    """openai/clip-vit-large-patch14-336 is a CLIPModel directory (text + vision)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    vc = CLIPVisionConfig.from_pretrained(parts["vision"])
    tc = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=16))
    full.save_pretrained(tmp_path / "clip")
    model, _, pre = llava15.assemble(parts["llm"], tmp_path / "clip", parts["proj"])
    torch.testing.assert_close(model.model.vision_tower.embeddings.patch_embedding.weight,
                               full.vision_model.embeddings.patch_embedding.weight, rtol=0, atol=0)
    # no image processor saved there: CLIP's mean/std at the tower's size
    assert pre.size == 28 and pre.background == (122, 116, 104)


def test_projector_checks(parts, tmp_path):
    sd = dict(parts["proj_sd"])
    del sd["model.mm_projector.2.bias"]
    torch.save(sd, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        llava15.load_projector(tmp_path / "partial.bin")
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)},
               tmp_path / "linear.bin")
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        llava15.load_projector(tmp_path / "linear.bin")
    # LLaVA's builder strips everything up to 'mm_projector.': a bare prefix loads the same
    torch.save({k.removeprefix("model."): v for k, v in parts["proj_sd"].items()}, tmp_path / "bare.bin")
    assert set(llava15.load_projector(tmp_path / "bare.bin")) == {"linear_1.weight", "linear_1.bias",
                                                                  "linear_2.weight", "linear_2.bias"}
    wrong = {k: (v[:, :16] if k.endswith("0.weight") else v) for k, v in parts["proj_sd"].items()}
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(ValueError, match="shape"):
        llava15.assemble(parts["llm"], parts["vision"], tmp_path / "wrong.bin")
    with pytest.raises(FileNotFoundError, match="model.projector_path"):
        llava15.assemble(parts["llm"], parts["vision"], tmp_path / "nope.bin")


# ---------------------------------------------------------------- images
def _processor(size, mean=CLIP_MEAN, std=CLIP_STD):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=list(mean), image_std=list(std))


@pytest.mark.parametrize("w,h", [(28, 14), (14, 28), (28, 13), (9, 28)])
def test_pad_to_square_with_the_mean_colour(w, h):
    rng = np.random.default_rng(w * 100 + h)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pre = llava15.Preprocess(_processor(28))
    got = pre(Image.fromarray(img))
    # by hand: LLaVA's background is int(x * 255) of the processor's mean (122, not round()'s 123)
    bg = np.array([122, 116, 104], np.uint8)
    assert pre.background == tuple(bg.tolist())
    square = np.empty((28, 28, 3), np.uint8)
    square[:] = bg
    if w > h:
        top = (w - h) // 2
        square[top:top + h, :] = img
    else:
        left = (h - w) // 2
        square[:, left:left + w] = img
    want = ((square / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.shape == (3, 28, 28)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pad_to_square_then_resize():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # w=56 > h=40
    pre = llava15.Preprocess(_processor(28, mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5)))
    square = np.empty((56, 56, 3), np.uint8)
    square[:] = (127, 63, 191)
    square[8:48] = img
    small = np.asarray(Image.fromarray(square).resize((28, 28), Image.BICUBIC), np.float64)
    want = ((small / 255.0 - np.array([0.5, 0.25, 0.75])) / 0.5).transpose(2, 0, 1)
    np.testing.assert_allclose(pre(Image.fromarray(img)), want, atol=1e-5)


def test_square_image_unchanged_and_grey_converted():
    pre = llava15.Preprocess(_processor(28))
    grey = Image.fromarray(np.full((28, 28), 200, np.uint8), mode="L")
    out = pre(grey)
    np.testing.assert_allclose(out[:, 0, 0], (200 / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-5)


# ---------------------------------------------------------------- conversation template
def test_prompt_text():
    turns = VICUNA.turns(RECORD, with_answer=True)
    text, spans = VICUNA.render(turns)
    assert text == (VICUNA_SYSTEM + " USER: <image>\nWhat is red? ASSISTANT: blue</s>USER: yes or no? "
                    "ASSISTANT: no</s>")
    assert [text[a:b] for a, b in spans] == [" blue</s>", " no</s>"]  # from the space: see template.render
    gen, _ = VICUNA.render(VICUNA.turns(RECORD, with_answer=False))
    assert gen.endswith("USER: yes or no? ASSISTANT:")
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. "
                              "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def test_token_layout_and_label_masking(parts, assembled):
    enc = _encoder(assembled, parts["root"])
    tok = enc.tok
    e = enc.encode(RECORD)
    tokens = tok.convert_ids_to_tokens(e.input_ids)
    want = (["<s>", *SYSTEM_WORDS, "USER", ":", *["<image>"] * 4, "What", "is", "red", "?", "ASSISTANT", ":",
             "blue", "</s>", "USER", ":", "yes", "or", "no", "?", "ASSISTANT", ":", "no", "</s>"])
    assert tokens == want
    labelled = [(i, tokens[i]) for i, lab in enumerate(e.labels) if lab != IGNORE]
    n = len(want)
    blue = want.index("blue")
    assert labelled == [(blue, "blue"), (blue + 1, "</s>"), (n - 2, "no"), (n - 1, "</s>")]
    assert all(e.labels[i] == e.input_ids[i] for i, _ in labelled)
    assert e.pixels.shape == (3, 28, 28) and e.pixels.dtype == np.float32
    assert enc.length(RECORD) == len(e.input_ids)
    # generation prompt: up to the last ASSISTANT:, nothing labelled
    g = enc.encode(RECORD, with_answer=False)
    assert tok.convert_ids_to_tokens(g.input_ids) == want[: n - 2]
    assert set(g.labels) == {IGNORE}
    assert g.pixels is not None
    # text-only: no image tokens, no pixels
    t = enc.encode(TEXT_RECORD)
    assert enc.image_id not in t.input_ids and t.pixels is None
    assert tok.convert_ids_to_tokens([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE]) == ["yes", "</s>"]


def test_lazy_training_set_with_the_vicuna_encoder(parts, assembled):
    """Warmup and train encode LLaVA-1.5 records batch by batch through this encoder too."""
    from icons.data.encode import LazyEncoded

    enc = _encoder(assembled, parts["root"])
    decoded = []
    load = enc.load_image
    enc.load_image = lambda r: decoded.append(r["id"]) or load(r)
    items = LazyEncoded([RECORD, TEXT_RECORD], enc)
    assert decoded == [] and len(items) == 2 and items.truncated == 0
    eager = [_encoder(assembled, parts["root"]).encode(r) for r in (RECORD, TEXT_RECORD)]
    got = [items[0], items[1]]
    for lazy, ref in zip(got, eager):
        assert lazy.input_ids == ref.input_ids and lazy.labels == ref.labels
        assert (lazy.pixels is None) == (ref.pixels is None)
    assert np.array_equal(got[0].pixels, eager[0].pixels) and decoded == [RECORD["id"]]


def test_template_edge_cases(parts, assembled):
    enc = _encoder(assembled, parts["root"])
    lead = {"id": "g", "conversations": [{"from": "gpt", "value": "blue"}, *TEXT_RECORD["conversations"]]}
    assert enc.encode(lead).input_ids == enc.encode(TEXT_RECORD).input_ids  # LLaVA skips a leading gpt turn
    with pytest.raises(ValueError, match="alternate"):
        enc.encode({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})
    with pytest.raises(ValueError, match="no image"):
        enc.encode({"id": "x", "conversations": [{"from": "human", "value": "<image>\na"},
                                                 {"from": "gpt", "value": "b"}]})
    short = _encoder(assembled, parts["root"], max_length=len(enc.encode(RECORD).input_ids) - 3)
    cut = short.encode(RECORD)
    assert cut.truncated and len(cut.input_ids) == short.max_length and cut.pixels is not None
    with pytest.raises(ValueError, match="longer than max_length"):
        _encoder(assembled, parts["root"], max_length=30).encode(RECORD)


def test_encoder_needs_the_image_token(parts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parts["llm"])  # as downloaded: no <image>
    with pytest.raises(ValueError, match="<image>"):
        llava15.Encoder(tok, llava15.Preprocess(_processor(28)), 4, 64)


# ---------------------------------------------------------------- config + stages
def _llava_overrides(parts) -> list[str]:
    return ["model=llava_1_5_7b", f"model.llm_path={parts['llm']}", f"model.vision_path={parts['vision']}",
            f"model.projector_path={parts['proj']}", "model.image_size=28", "model.patch_size=14",
            "model.dtype=float32", "model.max_length=256"]


def test_config_kind_llava_1_5(compose_cfg):
    obj = validate(compose_cfg(["model=llava_1_5_7b"]))
    m = obj.model
    assert (m.kind, m.template, m.dtype, m.image_size, m.patch_size, m.max_length) == (
        "llava_1_5", "vicuna_v1", "bfloat16", 336, 14, 2048)
    assert (m.lora.r, m.lora.alpha, m.lora.dropout) == (128, 256, 0.05)
    assert m.llm_path.endswith("vicuna-7b-v1.5") and m.projector_path.endswith("mm_projector.bin")
    assert validate(compose_cfg(["model=llava_1_5_13b"])).model.llm_path.endswith("vicuna-13b-v1.5")
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model=llava_1_5_7b", "model.llm_path=null"]))
    assert str(info.value) == "config error: model.llm_path=null must be set when model.kind=llava_1_5"
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model=llava_1_5_7b", "model.template=tiny"]))
    assert str(info.value) == "config error: model.template=tiny must be vicuna_v1 when model.kind=llava_1_5"
    with pytest.raises(ConfigError, match="model.dtype=fp8"):
        validate(compose_cfg(["model=llava_1_5_7b", "model.dtype=fp8"]))


def test_stages_assemble_the_base_and_load_a_saved_checkpoint(parts, assembled, compose_cfg, tmp_path):
    from icons.pipeline import Run
    from icons.stages.base import load_base, stage_base

    def base_of(overrides, run_dir):
        cfg = compose_cfg(overrides)
        validate(cfg)
        run = Run(cfg, run_dir, run_dir)
        stage_base(run)
        return load_base(run), cfg

    batch = _batch(_encoder(assembled), parts["root"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = assembled[0](**inputs).logits

    (model, tok), cfg = base_of(_llava_overrides(parts), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=0)

    # any HF LLaVA checkpoint directory: the assembled model saved with save_pretrained
    llava15.save(*assembled, tmp_path / "saved")
    overrides = ["model.kind=hf_llava", f"model.path={tmp_path / 'saved'}", "model.template=vicuna_v1",
                 "model.image_size=28", "model.patch_size=14", "model.max_length=256"]
    (model2, tok2), cfg2 = base_of(overrides, tmp_path / "b")
    assert model2.config.image_token_id == assembled[0].config.image_token_id
    assert tok2.pad_token == tok2.unk_token
    with torch.no_grad():
        torch.testing.assert_close(model2(**inputs).logits, want, rtol=1e-6, atol=1e-6)
    # the saved checkpoint's encoder: same prompt ids and pixels as the assembled one
    enc2 = llava15.make_encoder(cfg2.model, tok2, parts["root"])
    e1, e2 = _encoder(assembled, parts["root"]).encode(RECORD), enc2.encode(RECORD)
    assert e1.input_ids == e2.input_ids and e1.labels == e2.labels
    np.testing.assert_array_equal(e1.pixels, e2.pixels)
    # the config must describe the tower it loads
    with pytest.raises(ValueError, match="image_size"):
        llava15.make_encoder(compose_cfg(overrides[:-3] + ["model.image_size=32", "model.patch_size=8"]).model, tok2)


def test_stage_base_names_a_missing_part(parts, compose_cfg, tmp_path):
    from icons.pipeline import Run
    from icons.stages import stage_base

    cfg = compose_cfg(_llava_overrides(parts) + [f"model.vision_path={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="model.vision_path"):
        stage_base(Run(cfg, tmp_path, tmp_path))


# ---------------------------------------------------------------- experiments
def test_experiment_llava_20pct_composes(compose_cfg, tmp_path):
    cfg = compose_cfg(["+experiment=llava_20pct"], return_hydra_config=True)
    obj = validate(cfg)
    assert obj.experiment_name == "llava_20pct" and cfg.hydra.run.dir.startswith("outputs/llava_20pct/")
    assert (obj.model.name, obj.model.kind, obj.model.lora.r, obj.model.lora.alpha) == ("llava_1_5_7b", "llava_1_5",
                                                                                        128, 256)
    assert "gate_proj|up_proj|down_proj" in obj.model.lora.target_modules
    assert (obj.data.name, obj.data.kind, obj.data.path) == ("llava_665k", "llava_json",
                                                             "./playground/data/llava_v1_5_mix665k.json")
    assert (obj.tasks.kind, obj.tasks.dir) == ("llava_benchmarks", "./playground/data/icons_val")
    assert obj.stages[-2:] == ["train", "export"] and not {"eval", "report"} & set(obj.stages)  # lmms-eval
    t = obj.train
    assert (t.mode, t.lr, t.scheduler, t.warmup_ratio, t.epochs, t.batch_size) == ("lora", 2e-4, "cosine", 0.03, 1,
                                                                                  128)
    # the released code's feature recipe: plain gradients, one early checkpoint of a whole-pool run
    assert (obj.warmup.fraction, obj.warmup.epochs, obj.warmup.stop_after, obj.gradient.kind) == (1.0, 1, 0.1, "sgd")
    assert (obj.projection.kind, obj.projection.dim) == ("kronecker", 5120)
    assert (obj.consensus.method, obj.consensus.threshold_percentile, obj.selection.ratio) == ("vote", 80.0, 0.2)
    assert obj.trainer.accelerator == "gpu" and obj.selection.from_run is None
    # the user's files replace the placeholders
    mine = validate(compose_cfg(["+experiment=llava_20pct", f"data.path={tmp_path}/pool.jsonl",
                                 f"data.image_root={tmp_path}"]))
    assert (mine.data.path, mine.data.image_root) == (f"{tmp_path}/pool.jsonl", str(tmp_path))


def test_experiment_llava_13b_transfer_composes(compose_cfg, tmp_path):
    obj = validate(compose_cfg(["+experiment=llava_13b_transfer", f"selection.from_run={tmp_path}"]))
    assert obj.model.name == "llava_1_5_13b" and obj.model.llm_path.endswith("vicuna-13b-v1.5")
    assert obj.stages == ["check", "data", "base", "select", "subset", "train", "export"]  # evaluation: lmms-eval
    assert obj.selection.from_run == str(tmp_path) and obj.experiment_name == "llava_13b_transfer"
    assert (obj.train.mode, obj.train.lr, obj.data.kind) == ("lora", 2e-4, "llava_json")  # from llava_20pct


@pytest.mark.parametrize("experiment", ["llava_20pct", "llava_13b_transfer"])
def test_experiment_cfg_job_cli_offline(experiment, tmp_path):
    """``python -m icons.run +experiment=... --cfg job`` prints the config and touches nothing: no
    network (every proxy points at a closed port, hub offline), no files."""
    import os
    import subprocess
    import sys

    dead = "http://127.0.0.1:9"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", HTTP_PROXY=dead,
               HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, ALL_PROXY=dead, NO_PROXY="", no_proxy="",
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "icons.run", f"+experiment={experiment}", "--cfg", "job"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert f"experiment_name: {experiment}" in p.stdout
    assert "kind: llava_1_5" in p.stdout and "template: vicuna_v1" in p.stdout
    assert list(tmp_path.iterdir()) == []


def _fake_run(root: Path, pool_ids: list[str], pool_file: Path) -> Path:
    from icons.data.llava_json import file_signature
    from icons.data.pool import index_file
    from icons.io import write_json

    write_json(pool_file, [{"id": i, "conversations": [{"from": "human", "value": "q"},
                                                        {"from": "gpt", "value": "a"}]} for i in pool_ids])
    write_json(root / "data" / "ids.json", pool_ids)
    write_json(root / "data" / "manifest.json", {"key": "d", "pool": str(pool_file), "image_root": str(root),
                                                  "index": str(index_file(pool_file, root / "data" / "index")),
                                                  "ids": str(root / "data" / "ids.json"), "positions": None,
                                                  "signature": file_signature(pool_file), "meta": None, "val": {},
                                                  "test": {}})
    write_json(root / "stages.json", {"data": {"key": "d", "path": str(root / "data")}})
    return root


def test_selection_from_run(compose_cfg, tmp_path):
    from icons.io import read_json, write_json
    from icons.pipeline import Run
    from icons.stages import stage_select

    ids = [f"r{i}" for i in range(10)]
    src = tmp_path / "run7b"
    chosen_by = {"icons": ["r7", "r2", "r5"], "random": ["r0", "r9", "r4"], "resample": ["r1", "r3", "r6"]}
    for name, chosen in chosen_by.items():
        write_json(src / "selection" / name / "ids.json", chosen)
        write_json(src / "selection" / name / "manifest.json", {"key": f"k-{name}", "n": 3, "of": 10})
    run_dir = _fake_run(tmp_path / "run13b", ids, tmp_path / "pool.json")
    cfg = compose_cfg(["+experiment=llava_13b_transfer", f"selection.from_run={src}"])
    res = stage_select(Run(cfg, run_dir, run_dir))
    assert set(res) == {"icons", "random", "resample"} and res["icons"]["source_key"] == "k-icons"
    assert read_json(run_dir / "selection" / "icons" / "ids.json") == ["r7", "r2", "r5"]
    assert np.load(run_dir / "selection" / "icons" / "indices.npy").tolist() == [7, 2, 5]
    assert read_json(run_dir / "selection" / "random" / "ids.json") == ["r0", "r9", "r4"]
    assert stage_select(Run(cfg, run_dir, run_dir))["icons"]["wall_s"] == res["icons"]["wall_s"]  # finished: kept
    # another pool: refused
    other = _fake_run(tmp_path / "other", [f"x{i}" for i in range(10)], tmp_path / "pool2.json")
    with pytest.raises(ValueError, match="another pool"):
        stage_select(Run(cfg, other, other))
    with pytest.raises(FileNotFoundError, match="no finished selection"):
        stage_select(Run(compose_cfg(["+experiment=llava_13b_transfer", f"selection.from_run={tmp_path / 'x'}"]),
                         run_dir, run_dir))
    # without from_run and without scores: a clear error, not a KeyError
    fresh = _fake_run(tmp_path / "fresh", ids, tmp_path / "pool3.json")
    with pytest.raises(FileNotFoundError, match="selection.from_run"):
        stage_select(Run(compose_cfg(["+experiment=llava_13b_transfer"]), fresh, fresh))


# ---------------------------------------------------------------- what trains is kept in fp32
def test_one_bf16_step_with_the_projector_trainable_equals_an_fp32_update(parts):
    """LLaVA-1.5's LoRA recipe trains the projector at lr 2e-5 beside the LoRA weights. The base is
    bf16; every trainable weight keeps fp32 master weights and AdamW state, so one step moves each
    one exactly as AdamW computed in float64 from the same gradient says (bf16 weights would round
    most of a 2e-5 step away: their spacing near 0.1 is 5e-4)."""
    from types import SimpleNamespace

    import lightning as L
    from omegaconf import OmegaConf

    from icons.models.lora import add_lora
    from icons.train import PROJECTOR, OptimConfig, ShuffledBatches, fit, set_trainable

    model, tok, pre = llava15.assemble(parts["llm"], parts["vision"], parts["proj"], "bfloat16")
    torch.manual_seed(0)
    model = add_lora(model, OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0,
                                              "target_modules": r".*language_model.*\.(q_proj|v_proj)"}))
    set_trainable(model, "lora", projector=True)
    enc = llava15.Encoder(tok, pre, 4, 256, parts["root"])
    items = [enc.encode(RECORD), enc.encode(TEXT_RECORD)]
    seen = {}

    class Snapshot(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            for n, p in module.model.named_parameters():
                if p.requires_grad:
                    seen[n] = (p.detach().double().clone(), p.grad.detach().double().clone(), p)

    from icons import train

    real = train.make_trainer
    lr = 2e-5
    trainer_cfg = SimpleNamespace(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="bf16-mixed",
                                  progress_bar=False)
    train.make_trainer = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Snapshot()], **k)
    try:
        fit(model, ShuffledBatches(items, 2, 1, 0, tok.pad_token_id),
            OptimConfig(lr=lr, warmup_ratio=0.0, scheduler="constant", grad_clip=0.0, projector_lr=lr), trainer_cfg)
    finally:
        train.make_trainer = real
    projector = [n for n in seen if PROJECTOR in n]
    assert projector and any("lora_" in n for n in seen)
    assert all(p.dtype == torch.float32 for _, _, p in seen.values())  # fp32 master weights
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the frozen base stays bf16
    for n, (before, g, p) in seen.items():
        # AdamW's first step, written out: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps)
        want = before - lr * g / (g.abs() + 1e-8)
        assert (p.detach().double() - want).abs().max().item() < 1e-6, n
