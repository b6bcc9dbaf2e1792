"""The training pool: a LLaVA-665K analog made of instruction *families*.

Large redundant and off-target families (single-word VQA, short captions, text-only chat) sit
beside rare task-relevant ones (degraded images, science questions, multiple choice, signs), so
that a random 20% is genuinely short of some skills. Noise is added on top: exact duplicates,
wrong answers (another answer of the same family) and garbage answers. Each record carries a
``meta`` dict (family, noise, duplicate-of) that the builder moves to a side file.
"""
from __future__ import annotations

import copy
import random

from .language import LETTERS, QA, SCIENCE_FACTS, ask, caption, dotted_options, short_caption, text_only_qa
from .pretraining import passage_example
from .scenes import sample_degraded, sample_scene, sample_sign

#: share of text-only chat that asks about a given passage (the rest: arithmetic and trivia)
PASSAGE_SHARE = 0.5
SHORT = " Answer the question using a single word or phrase ."
MC_SUFFIX = " Answer with the option's letter from the given choices directly ."

# Share of each family in the pool (LLaVA-665K counterpart in the comment).
FAMILY_SHARES = {
    "vqa": 0.06,        # VQAv2 / OKVQA short answers; half are near-duplicate colour questions
    "text_only": 0.18,  # ShareGPT text-only chat (about 6% of 665K; more here, as off-target mass),
                        # half of it questions about a given passage (PASSAGE_SHARE)
    "conv": 0.12,       # LLaVA-Instruct conversations, 2-3 turns, sentence answers
    "caption": 0.10,    # short captions (TextCaps / brief descriptions)
    "ground": 0.06,     # RefCOCO / VG region descriptions
    "detail": 0.05,     # LLaVA detailed descriptions
    "gqa": 0.05,        # GQA relational questions
    "ocr": 0.05,        # OCR-VQA: reading signs
    "exist": 0.04,      # VG existence yes/no
    "verify": 0.08,     # VQAv2 / GQA verify questions: a stated colour, place, count or number, yes/no
    "mc": 0.12,         # A-OKVQA multiple choice (66K of 665K), four options as in A-OKVQA
    "degraded": 0.04,   # low-quality images, with 'unanswerable' answers
    "science": 0.05,    # knowledge questions about the pictured object
}


def _turn(q: str, a: str, image: bool, first: bool) -> list[dict]:
    human = f"<image>\n{q}" if (image and first) else q
    return [{"from": "human", "value": human}, {"from": "gpt", "value": a}]


def _short(rng, spec, skills) -> QA | None:
    for _ in range(20):
        qa = ask(spec, rng.choice(skills), rng)
        if qa is not None:
            return qa
    return None


def mc_prompt(stem: str, options: list[str]) -> str:
    return f"{stem} {dotted_options(options)}"


def mc_options(qa: QA, rng: random.Random, n: int) -> list[str]:
    distractors = [c for c in qa.candidates if c != qa.answer]
    opts = rng.sample(distractors, min(n - 1, len(distractors))) + [qa.answer]
    rng.shuffle(opts)
    return opts


def make_record(family: str, rng: random.Random, split: str = "train") -> dict | None:
    """One pool record of ``family``: LLaVA conversation + '_spec' (image spec) + 'meta'."""
    spec = None
    if family == "text_only":
        if rng.random() < PASSAGE_SHARE:  # reading comprehension about a given passage
            return {"conversations": passage_example(rng), "_spec": None, "meta": {"family": family}}
        turns = []
        for k in range(rng.choice([1, 1, 2])):
            q, a = text_only_qa(rng)
            turns += _turn(q, a, False, k == 0)
        return {"conversations": turns, "_spec": None, "meta": {"family": family}}
    if family == "verify":
        spec = sample_scene(rng) if rng.random() < 0.7 else sample_sign(rng, split)
    if family in ("vqa", "conv", "caption", "ground", "detail", "gqa", "exist", "mc", "science"):
        spec = sample_scene(rng, 2 if family == "gqa" else 1)
    if family == "caption":
        spec = spec if rng.random() < 0.7 else sample_sign(rng, split)
    if family == "ocr":
        spec = sample_sign(rng, split)
    if family == "degraded":
        spec = sample_degraded(rng, split, severe=rng.random() < 0.4)

    if family == "vqa":
        if rng.random() < 0.5:  # the redundant half: colour of a lone object
            spec = sample_scene(rng, 1, 1)
            qa = ask(spec, "color", rng)
        else:
            qa = _short(rng, spec, ["color", "shape", "count", "size", "exist"])
        turns = _turn(qa.question + SHORT, qa.answer, True, True)
    elif family == "conv":
        turns = []
        for k in range(rng.choice([2, 3])):
            qa = _short(rng, spec, ["color", "shape", "count", "size", "exist", "position", "relation"])
            turns += _turn(qa.question, qa.sentence, True, k == 0)
    elif family == "caption":
        q = rng.choice(["Give a short caption .", "Write a brief caption for the image ."])
        turns = _turn(q, short_caption(spec), True, True)
    elif family == "ground":
        qa = _short(rng, spec, ["position", "what_at"])
        turns = _turn(qa.question, qa.answer, True, True)
    elif family == "detail":
        q = rng.choice(["Describe the image in detail .", "What do you see in the image ?"])
        turns = _turn(q, caption(spec), True, True)
    elif family == "gqa":
        qa = _short(rng, spec, ["relation"])
        if qa is None:
            return None
        turns = _turn(qa.question + SHORT, qa.answer, True, True)
    elif family == "ocr":
        qa = _short(rng, spec, ["number", "number", "sign_color"])
        turns = _turn(qa.question + SHORT, qa.answer, True, True)
    elif family == "exist":
        qa = ask(spec, "exist", rng)
        if qa is None:
            return None
        suffix = SHORT if rng.random() < 0.7 else " Please answer yes or no ."
        turns = _turn(qa.question + suffix, qa.answer, True, True)
    elif family == "mc":
        qa = _short(rng, spec, ["color", "shape", "count", "position"])
        # Always four options, as A-OKVQA: with 2-4 the answer was A 36% and D 8% of the time, a
        # letter prior that fails MMBench's circular evaluation (generator v7; docs/findings.md)
        opts = mc_options(qa, rng, 4)
        prompt = mc_prompt(qa.question, opts) + MC_SUFFIX
        turns = _turn(prompt, LETTERS[opts.index(qa.answer)], True, True)
    elif family == "verify":
        qa = ask(spec, "verify", rng)
        suffix = SHORT if rng.random() < 0.5 else " Please answer yes or no ."
        turns = _turn(qa.question + suffix, qa.answer, True, True)
    elif family == "science":
        qa = ask(spec, "science", rng)
        if rng.random() < 0.5:
            turns = _turn(qa.question + SHORT, qa.answer, True, True)
        else:  # ScienceQA-style: the fact given as context, the answer picked among 2-3 options
            opts = mc_options(qa, rng, 3 if qa.skill == "sides" else 2)
            prompt = f"{SCIENCE_FACTS[qa.skill]} {mc_prompt(qa.question, opts)}{MC_SUFFIX}"
            turns = _turn(prompt, LETTERS[opts.index(qa.answer)], True, True)
    elif family == "degraded":
        base = spec["base"]
        qa = _short(rng, base, ["color", "shape", "count"] if base["kind"] == "scene" else ["number", "sign_color"])
        answer = "unanswerable" if spec["level"] == "severe" else qa.answer
        if rng.random() < 0.5:
            q = qa.question + " If the image is too poor to answer , say unanswerable ."
        else:
            q = qa.question + " When the provided information is insufficient , respond with ' unanswerable ' ." + SHORT
        turns = _turn(q, answer, True, True)
    else:
        raise ValueError(f"unknown family {family!r}")
    return {"conversations": turns, "_spec": spec, "meta": {"family": family}}


def build_pool(n: int, seed: int, p_duplicate: float, p_label_noise: float, p_garbage: float,
               forbidden: set[str] | None = None, shares: dict[str, float] | None = None) -> list[dict]:
    """``n`` pool records (ids ``pool-000000``...), deterministic in ``seed``.

    ``forbidden`` holds spec keys of validation/test images: a pool image never equals one.
    ``shares``: family weights replacing FAMILY_SHARES (families left out get none).
    """
    from .scenes import spec_key

    rng = random.Random(seed)
    forbidden = forbidden or set()
    shares = FAMILY_SHARES if shares is None else shares
    families = [f for f in shares if shares[f] > 0]
    weights = [shares[f] for f in families]
    n_dup = int(round(n * p_duplicate))
    records: list[dict] = []
    while len(records) < n - n_dup:
        fam = rng.choices(families, weights)[0]
        rec = make_record(fam, rng)
        if rec is None or (rec["_spec"] is not None and spec_key(rec["_spec"]) in forbidden):
            continue
        records.append(rec)
    # Noise on the originals: wrong answers taken from other records of the same family.
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_family.setdefault(r["meta"]["family"], []).append(i)
    garbage_words = ["banana", "seven", "maybe", "hello", "the", "sign", "left", "blue", "object"]
    for i, r in enumerate(records):
        u = rng.random()
        gpt = [t for t in r["conversations"] if t["from"] == "gpt"]
        if u < p_label_noise:
            donor = records[rng.choice(by_family[r["meta"]["family"]])]
            donor_answers = [t["value"] for t in donor["conversations"] if t["from"] == "gpt"]
            gpt[-1]["value"] = rng.choice(donor_answers)
            r["meta"]["noise"] = "label"
        elif u < p_label_noise + p_garbage:
            gpt[-1]["value"] = " ".join(rng.choices(garbage_words, k=rng.randint(1, 5)))
            r["meta"]["noise"] = "garbage"
    # Exact duplicates of random originals, placed at random positions.
    originals = list(records)
    for _ in range(n_dup):
        src = rng.randrange(len(originals))
        dup = copy.deepcopy(originals[src])
        dup["meta"]["dup_of"] = src  # an index into ``originals``: replaced by its id below
        records.insert(rng.randrange(len(records) + 1), dup)
    for i, r in enumerate(records):
        r["id"] = f"pool-{i:06d}"
    for r in records:
        if "dup_of" in r["meta"]:
            r["meta"]["dup_of"] = originals[r["meta"]["dup_of"]]["id"]
    return records
