"""The baselines' stores: the forward pass's rows against a one-record-at-a-time computation,
resume from a part-done mask, refusal of a store made another way, CLIP-Score against the CLIP
model's own embeddings, and every baseline through the pipeline at smoke size (exact budget,
the same rows twice)."""
import numpy as np
import pytest
import torch
from PIL import Image

from icons.data.encode import IGNORE, Encoder, collate
from icons.selectors.forward import fill_store
from icons.selectors.store import RowStore, load_column

from .tiny_lora import tiny_lora_model


def _records(tmp_path, n=9):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        words = " ".join(["red", "circle", "square", "blue", "two"][j % 5] for j in range(i + 2))
        r = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"What is shown ? {words}"},
                                              {"from": "gpt", "value": f"A {words} ."}]}
        if i % 3 == 0:
            path = tmp_path / f"im{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            r["image"] = str(path)
            r["conversations"][0]["value"] = "<image>\n" + r["conversations"][0]["value"]
        recs.append(r)
    return recs


@pytest.fixture(scope="module")
def model():
    tok, m = tiny_lora_model()
    return tok, m


def _one_at_a_time(model, enc, rec):
    e = enc.encode(rec)
    b = collate([e], enc.tok.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    **({"pixel_values": b["pixel_values"]} if "pixel_values" in b else {}), output_hidden_states=True)
    y = b["labels"][0, 1:]
    keep = y != IGNORE
    logits = out.logits[0, :-1][keep]
    loss = torch.nn.functional.cross_entropy(logits, y[keep]).item()
    p = torch.softmax(logits, -1)
    el2n = (p - torch.nn.functional.one_hot(y[keep], p.shape[1])).norm(dim=1).mean().item()
    h = out.hidden_states[-1][0]
    t = torch.arange(1, len(h) + 1, dtype=torch.float32)
    return {"loss": loss, "el2n": el2n, "answer_tokens": float(keep.sum()), "embed": h.mean(0).numpy(),
            "embed_weighted": ((h * t[:, None]).sum(0) / t.sum()).numpy()}


def test_forward_store_rows_equal_one_record_at_a_time(model, tmp_path):
    tok, m = model
    enc = Encoder(tok, 16, 32, 160)
    recs = _records(tmp_path)
    res = fill_store(m, enc, recs, tmp_path / "s", "pool", {"model": "x"}, [0, 1], "float32", batch_size=4)
    assert res["complete"] and res["rows_done"] == len(recs)
    for i, r in enumerate(recs):
        want = _one_at_a_time(m, enc, r)
        for name, value in want.items():
            got = np.asarray(load_column(tmp_path / "s", name))[i]
            np.testing.assert_allclose(got.reshape(-1), np.reshape(value, -1), rtol=1e-4, atol=1e-5, err_msg=name)
    feats = np.asarray(load_column(tmp_path / "s", "coincide"))
    assert feats.shape == (len(recs), 2 * 2 * 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1)[1:3], [0.5 ** 0.5] * 2, rtol=1e-5)  # text-only: half
    np.testing.assert_allclose(np.linalg.norm(feats[0]), 1.0, rtol=1e-5)  # with an image: image and text parts


def test_forward_store_resumes_the_rows_not_done_and_refuses_another_recipe(model, tmp_path):
    tok, m = model
    enc = Encoder(tok, 16, 32, 160)
    recs = _records(tmp_path)
    fill_store(m, enc, recs, tmp_path / "s", "pool", {"model": "x"}, [], "float32", batch_size=4)
    before = {k: np.load(tmp_path / "s" / f"pool_{k}.npy").copy() for k in ("loss", "embed")}
    done = np.load(tmp_path / "s" / "pool_done.npy")
    done[[0, 5]] = False  # as if killed before two rows were committed
    np.save(tmp_path / "s" / "pool_done.npy", done)
    res = fill_store(m, enc, recs, tmp_path / "s", "pool", {"model": "x"}, [], "float32", batch_size=4)
    assert res["complete"] and 2 <= res["rows_done"] < len(recs)
    for k, v in before.items():
        np.testing.assert_array_equal(np.load(tmp_path / "s" / f"pool_{k}.npy"), v)
    with pytest.raises(ValueError, match="cannot resume"):
        RowStore.open(tmp_path / "s", len(recs), {"loss": (1, "float32")}, {"model": "y"})
    done[3] = False
    np.save(tmp_path / "s" / "pool_done.npy", done)
    with pytest.raises(ValueError, match="rows have no values yet"):
        load_column(tmp_path / "s", "loss")


def _tiny_clip(path, tok):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                  "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                                  "bos_token_id": tok.bos_token_id},
                     vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(path)


def test_clip_score_is_the_cosine_of_clips_image_and_text_embeddings(model, tmp_path):
    from icons.selectors import baselines
    from icons.selectors.clip import conversation_text, fill_clip_store, load_clip

    tok, _ = model
    _tiny_clip(tmp_path / "clip", tok)
    recs = _records(tmp_path)
    res = fill_clip_store(tmp_path / "clip", recs, None, tmp_path / "c", {"x": 1}, 2, "cpu")
    assert res["complete"]
    got = np.asarray(load_column(tmp_path / "c", "clip_score"))[:, 0]
    clip, ctok, proc = load_clip(tmp_path / "clip")
    for i, r in enumerate(recs):
        if "image" not in r:
            assert np.isnan(got[i])
            continue
        assert "<image>" not in conversation_text(r) and "A " in conversation_text(r)
        with torch.no_grad(), Image.open(r["image"]) as im:
            pixels = torch.as_tensor(proc(im.convert("RGB"), return_tensors="np")["pixel_values"])
            img = clip.get_image_features(pixel_values=pixels)
            t = ctok([conversation_text(r)], return_tensors="pt", truncation=True, max_length=77)
            txt = clip.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        assert got[i] == pytest.approx(torch.nn.functional.cosine_similarity(img, txt).item(), abs=1e-5)
    picked = baselines.clip_score(got, 3)
    assert set(picked.tolist()) == {i for i, r in enumerate(recs) if "image" in r}  # the 3 with images


BASELINES = ["length", "perplexity", "el2n", "semdedup", "d2_pruning", "coincide", "rds"]


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    from icons.models.base import pretrain_base

    out = tmp_path_factory.mktemp("base") / "tiny_llava_base"
    pretrain_base(out, examples=256, batch_size=32, text_hidden=64, text_layers=2, vision_hidden=32)
    return out


def _run(tmp_path, base, name, *extra):
    from icons.pipeline import run_stages

    from .test_pipeline import TINY
    from .conftest import compose_config

    cfg = compose_config([*TINY, f"model.path={base}", f"cache_dir={tmp_path / 'cache'}", *extra])
    return run_stages(cfg, tmp_path / name)


def test_every_baseline_selects_the_budget_and_the_same_rows_twice(tmp_path, smoke_base):
    import json

    stages = "stages=[data,base,warmup,features,scores,forward,select]"
    sel = f"selectors=[icons,{','.join(BASELINES)}]"
    _run(tmp_path, smoke_base, "a", stages, sel)
    _run(tmp_path, smoke_base, "b", stages, sel)
    n = len(json.loads((tmp_path / "a" / "data" / "ids.json").read_text()))
    picks = {}
    for name in ["icons", *BASELINES]:
        a = np.load(tmp_path / "a" / "selection" / name / "indices.npy")
        b = np.load(tmp_path / "b" / "selection" / name / "indices.npy")
        assert len(a) == int(0.2 * n) == len(set(a.tolist())), name
        np.testing.assert_array_equal(a, b, err_msg=name)
        picks[name] = set(a.tolist())
    assert len({frozenset(p) for p in picks.values()}) == len(picks)  # eight different selections
    # the forward stores are computed once per model and shared by every baseline that reads them
    stores = json.loads((tmp_path / "a" / "stages.json").read_text())
    assert sorted(k for k in stores if k.startswith("forward/")) == ["forward/base", "forward/warmup"]


def test_clip_score_without_a_clip_model_stops_with_one_line(tmp_path):
    from icons.config import ConfigError, validate

    from .conftest import compose_config

    with pytest.raises(ConfigError, match=r"^config error: selectors=\[full, clip_score\] contains clip_score, which "
                                          r"needs a CLIP model with a text tower \(selector.clip_score.model"):
        validate(compose_config(["selectors=[full,clip_score]"]))
    validate(compose_config(["selectors=[full,clip_score]", f"selector.clip_score.model={tmp_path}"]))


def test_a_baseline_without_its_forward_store_names_the_missing_stage(tmp_path, smoke_base):
    with pytest.raises(FileNotFoundError, match="reads the base forward store.*put forward before select"):
        _run(tmp_path, smoke_base, "d", "stages=[data,base,select]", "selectors=[perplexity]")
