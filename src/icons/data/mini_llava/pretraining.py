"""The stage-1 data of the tiny base: what Vicuna + LLaVA's stage-1 projector bring to a 7B run.

A stream of (a) brief-description prompts answered by the image's caption (visual alignment, like
LCS-558K), (b) text-only "Context : <caption> Question : <q>" answered with the short answer, so
the language model learns to answer questions about described scenes before it ever sees the
target tasks' formats, and (c) text-only trivia (arithmetic, shape and colour facts). Digits come
from the pool's half of the digit images only.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

from .language import ask, caption, skills_for, text_only_qa
from .scenes import sample_degraded, sample_scene, sample_sign

DESCRIBE_PROMPTS = ("Describe the image briefly .", "What is in the image ?", "Give a brief description of the image .")
CONTEXT_TEMPLATE = "Context : {caption} Question : {question}"


def _image_spec(rng: random.Random) -> dict:
    u = rng.random()
    if u < 0.55:
        return sample_scene(rng)
    if u < 0.9:
        return sample_sign(rng, "train")
    return sample_degraded(rng, "train", severe=rng.random() < 0.4)


def base_example(rng: random.Random, text_qa_fraction: float) -> dict:
    """One stage-1 example as a LLaVA record with an image spec in '_spec' (None if text-only)."""
    u = rng.random()
    if u < text_qa_fraction * 0.85:
        spec = sample_scene(rng) if rng.random() < 0.7 else sample_sign(rng, "train")
        qa = None
        while qa is None:
            qa = ask(spec, rng.choice(skills_for(spec)), rng)
        q = CONTEXT_TEMPLATE.format(caption=caption(spec), question=qa.question)
        return {"_spec": None, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": qa.answer}]}
    if u < text_qa_fraction:
        q, a = text_only_qa(rng)
        return {"_spec": None, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    spec = _image_spec(rng)
    return {"_spec": spec, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(DESCRIBE_PROMPTS)},
        {"from": "gpt", "value": caption(spec)}]}


def base_stream(seed: int, text_qa_fraction: float) -> Iterator[dict]:
    rng = random.Random(seed)
    while True:
        yield base_example(rng, text_qa_fraction)
