"""Shared pieces of the benchmark converters: prompts, the refusal, the seeded sample, records."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Sequence

#: LLaVA-1.5's response-format prompts (paper, Table 7; its eval question files), each appended
#: to the question after a newline.
SHORT = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
MC_EN = "Answer with the option's letter from the given choices directly."
MC_CN = "请直接回答选项字母。"
LETTERS = "ABCDEFGHIJ"


class EvaluatedSplitError(ValueError):
    """The source file is (part of) the split the task is evaluated on."""


class SourceError(ValueError):
    """The source file is not what the converter expects."""


def majority(answers: Iterable[str]) -> str:
    """The most frequent answer; ties go to the one seen first (Counter keeps insertion order)."""
    counts = Counter(a.strip() for a in answers if a and a.strip())
    if not counts:
        raise SourceError("an item has no answer")
    return counts.most_common(1)[0][0]


def sample(keys: Sequence[Any], n: int, seed: int) -> list[int]:
    """Indices of a fixed-seed sample of ``min(n, len(keys))`` items, in ascending key order.

    Items are ordered by their key first, so the sample depends on the items and the seed only,
    never on the order of the source file.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    if len(set(keys)) != len(keys):
        raise SourceError("duplicate item ids in the source")
    picked = random.Random(seed).sample(range(len(order)), min(n, len(order)))
    return [order[i] for i in sorted(picked)]


def record(task: str, source_id: Any, question: str, answer: str, image: str | None, **extra) -> dict:
    """A validation record in LLaVA's conversation format (``<image>`` first, as LLaVA trains)."""
    human = f"<image>\n{question}" if image is not None else question
    rec = {"id": f"{task}-{source_id}", "conversations": [{"from": "human", "value": human},
                                                          {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    rec.update(task=task, answer=answer, **extra)
    return rec


def join(prefix: str | None, path: str) -> str:
    return f"{prefix.rstrip('/')}/{path}" if prefix else path


def suffixed(question: str, *suffixes: str) -> str:
    return "\n".join([question.strip(), *suffixes])
