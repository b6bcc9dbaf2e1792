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


DIGIT_RECORDS = RECORDS + [
    {"id": "digit", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many apples?"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "And dogs?"}, {"from": "gpt", "value": "12"}]},
    {"id": "digit-text", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]},
]


def _preprocess_v1_targets(text: str, tok, image_index: int, has_image: bool) -> list[int]:
    """LLaVA's ``preprocess_v1`` label masking, written out from its arithmetic (llava/train/train.py):
    rounds split at ``</s>``, each round's length and its instruction's length by re-tokenizing them
    (``tokenizer_image_token`` with an image, ``tokenizer`` without), ``- 2`` for the bos and the
    trailing '▁' of "ASSISTANT: ", one less for every round after the first when the tokenizer writes
    no dummy-prefix '▁' after ``</s>`` (LLaVA tests ``not tokenizer.legacy``, which meant exactly that
    under its pinned tokenizers 0.15; measured here, so that the arithmetic stays self-consistent)."""
    ids = _llava_ids(text, tok, image_index) if has_image else tok(text).input_ids
    target = list(ids)
    length = (lambda s: len(_llava_ids(s, tok, image_index))) if has_image else (lambda s: len(tok(s).input_ids))
    sep = " ASSISTANT: "
    after_eos = tok("a</s>USER", add_special_tokens=False).input_ids
    no_prefix_after_eos = len(after_eos) < len(tok("a</s>", add_special_tokens=False).input_ids) + len(
        tok("USER", add_special_tokens=False).input_ids)
    cur = 1
    target[0] = IGNORE
    for i, rou in enumerate(text.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = length(rou), length(parts[0]) - 2
        if i != 0 and no_prefix_after_eos:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    assert cur == len(ids), "LLaVA's own check: a mismatch would mask the whole example"
    return target


def test_label_masking_equals_llavas_preprocess_v1_with_digit_answers(vicuna_dir, tmp_path):
    """A SentencePiece tokenizer that splits digits writes '▁' then '2' for " 2": LLaVA keeps that '▁'
    in the loss (its instruction length stops at the ':'), so icons does too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vicuna_dir)
    image_id = llava15.add_image_token(tok)
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "x.png")
    pre = llava15.Preprocess(llava15.image_processor(tmp_path, 28))
    enc = llava15.Encoder(tok, pre, n_image_tokens=4, max_length=512, image_root=tmp_path)
    space = tok.convert_tokens_to_ids("▁")
    kept_space = 0
    for rec in DIGIT_RECORDS:
        e = enc.encode(rec)
        text, _ = TEMPLATES["vicuna_v1"].render(TEMPLATES["vicuna_v1"].turns(rec, True))
        first_image = [k for k, t in enumerate(e.input_ids) if t == image_id][:1]
        labels = [lab for k, (t, lab) in enumerate(zip(e.input_ids, e.labels))
                  if t != image_id or k in first_image]  # one image index, as LLaVA's ids have
        want = _preprocess_v1_targets(text, tok, image_id, "image" in rec)
        assert labels == want, rec["id"]
        kept_space += sum(1 for lab in labels if lab == space)
    assert kept_space >= 3  # the digit answers' '▁' is in the loss
