"""LLaVA-1.5's encoding with a real SentencePiece Llama tokenizer, saved the way Vicuna-v1.5 ships
it (``tokenizer.model`` + a ``LlamaTokenizer`` config, no ``tokenizer.json``): it loads offline,
and icons' token ids equal LLaVA's ``tokenizer_image_token`` on the same vicuna_v1 prompt
(re-implemented here: each text chunk tokenized with its bos, bos stripped from all but the
first, one image index between chunks), with loss only on each answer and its ``</s>``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from icons.data.encode import IGNORE
from icons.models import llava15
from icons.models.template import TEMPLATES, VICUNA_SYSTEM

spm = pytest.importorskip("sentencepiece")  # a dependency (pyproject); Vicuna's tokenizer needs it

CORPUS = [VICUNA_SYSTEM, "USER: What is the color of the car? ASSISTANT: The car is red.",
          "Describe the image in detail.", "There are two dogs on the grass near a tree.",
          "Answer the question using a single word or phrase. Yes, no, 12 apples."]


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vicuna_tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", split_digits=True, remove_extra_whitespaces=False, minloglevel=2)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    # Vicuna-7B-v1.5's tokenizer_config.json, in substance
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "legacy": False, "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False, "padding_side": "right"}))
    return d


def _llava_ids(prompt: str, tok, image_index: int) -> list[int]:
    chunks = [tok(c).input_ids for c in prompt.split(llava15.IMAGE_TOKEN)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_index)
        ids.extend(chunk[offset:])
    return ids


def _collapse(ids: list[int], image_id: int) -> list[int]:
    return [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]


RECORDS = [
    {"id": "single", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the color of the car?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "late-image", "image": "x.png", "conversations": [
        {"from": "human", "value": "Describe the image in detail.\n<image>"},
        {"from": "gpt", "value": "There are two dogs on the grass near a tree."},
        {"from": "human", "value": "How many apples?"}, {"from": "gpt", "value": "12 apples"}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "Answer yes or no."}, {"from": "gpt", "value": "Yes"}]},
]


def test_vicuna_tokenizer_loads_and_encodes_like_llava(vicuna_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vicuna_dir)
    assert not (vicuna_dir / "tokenizer.json").exists() and tok.bos_token_id == 1 and tok.eos_token_id == 2
    image_id = llava15.add_image_token(tok)
    assert tok.pad_token == tok.unk_token
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "x.png")
    pre = llava15.Preprocess(llava15.image_processor(tmp_path, 28))
    enc = llava15.Encoder(tok, pre, n_image_tokens=4, max_length=512, image_root=tmp_path)
    for rec in RECORDS:
        e = enc.encode(rec)
        text, spans = TEMPLATES["vicuna_v1"].render(TEMPLATES["vicuna_v1"].turns(rec, True))
        assert _collapse(e.input_ids, image_id) == _llava_ids(text, tok, image_id), rec["id"]
        assert e.input_ids.count(image_id) == (4 if "image" in rec else 0)
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        runs, cur = [], []
        for t, lab in zip(e.input_ids, e.labels):
            if lab != IGNORE:
                assert lab == t
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        assert [r[-1] for r in runs] == [tok.eos_token_id] * len(answers), rec["id"]
        assert [tok.decode(r[:-1]).strip() for r in runs] == answers, rec["id"]
        assert enc.length(rec) == len(e.input_ids)
