"""Ten target tasks mirroring the paper's benchmarks, each with its own prompt format and metric.

| task        | mirrors          | items                                   | metric                        |
|-------------|------------------|-----------------------------------------|-------------------------------|
| vqav2       | VQAv2            | colour / shape / count / size / yes-no  | exact match                   |
| gqa         | GQA              | spatial relations between objects       | exact match                   |
| vizwiz      | VizWiz           | degraded images, 'unanswerable'         | exact match                   |
| sqa         | ScienceQA-IMG    | context + knowledge about the object    | option-letter accuracy        |
| textvqa     | TextVQA          | numbers (and colours) on signs          | exact match                   |
| pope        | POPE             | balanced existence, adversarial negatives | yes/no accuracy             |
| mme         | MME (5 sub-tasks)| yes+no question pairs per image         | mean over sub-tasks of (acc + acc+)/2 |
| mmbench_en  | MMBench-en       | 4-way multiple choice                   | circular option accuracy      |
| mmbench_cn  | MMBench-cn       | same skills, a second phrasing          | circular option accuracy      |
| llavaw      | LLaVA-Bench (W)  | detailed descriptions + sentence answers| token F1                      |

Every test record keeps what its metric needs (``answer``, ``candidates``, MC ``options``, MME
``subtask``/``pair``) beside the LLaVA ``conversations``. Images come from the evaluation half of
the digit images and never equal a pool image (checked by the builder).
"""
from __future__ import annotations

import random
import zlib

from .families import LETTERS, SHORT, dotted_options, mc_options
from .language import QA, SCIENCE_FACTS, ask, caption, number_text, q_exist
from .scenes import CELLS, COLORS, sample_degraded, sample_scene, sample_sign

TASK_NAMES = ["vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench_en", "mmbench_cn", "llavaw"]
METRIC = {"vqav2": "exact", "gqa": "exact", "vizwiz": "exact", "sqa": "option", "textvqa": "exact",
          "pope": "exact", "mme": "mme", "mmbench_en": "circular", "mmbench_cn": "circular", "llavaw": "f1"}
MME_SUBTASKS = ["existence", "count", "position", "color", "ocr"]
VIZWIZ = " When the provided information is insufficient , respond with ' unanswerable ' ." + SHORT
MC_EN = " Answer with the option's letter from the given choices directly ."
MC_CN = " Reply with the letter of the correct choice ."
LONG_ANSWER_TASKS = {"llavaw"}


def task_seed(name: str, split: str, seed: int) -> int:
    # crc32, not hash(): Python's string hash changes from process to process.
    return zlib.crc32(f"{name}/{split}/{seed}".encode())


def mc_text(task: str, stem: str, options: list[str], context: str | None = None) -> str:
    """The prompt of a multiple-choice item; evaluation re-renders it for each rotation."""
    opts = dotted_options(options)
    if task == "mmbench_cn":
        return f"{stem} Choices : {opts}{MC_CN}"
    head = f"Context : {context} " if context else ""
    return f"{head}Question : {stem} Options : {opts}{MC_EN}"


def _record(prompt: str, reply: str, spec: dict | None, **extra) -> dict:
    human = f"<image>\n{prompt}" if spec is not None else prompt
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": reply}],
            "_spec": spec, **extra}


def _qa(rng, spec, skills) -> QA:
    while True:
        qa = ask(spec, rng.choice(skills), rng)
        if qa is not None:
            return qa


def _item(task: str, rng: random.Random, index: int) -> list[dict]:
    """One test/val item of ``task``: usually one record; MME gives a yes/no pair."""
    if task == "vqav2":
        spec = sample_scene(rng)
        qa = _qa(rng, spec, ["color", "shape", "count", "size", "exist"])
        return [_record(qa.question + SHORT, qa.answer, spec, answer=qa.answer, candidates=list(qa.candidates))]
    if task == "gqa":
        spec = sample_scene(rng, 2)
        qa = ask(spec, "relation", rng)
        if qa is None:
            return []
        return [_record(qa.question + SHORT, qa.answer, spec, answer=qa.answer, candidates=list(qa.candidates))]
    if task == "vizwiz":
        spec = sample_degraded(rng, "eval", severe=rng.random() < 0.4)
        base = spec["base"]
        qa = _qa(rng, base, ["color", "shape", "count"] if base["kind"] == "scene" else ["number", "sign_color"])
        ans = "unanswerable" if spec["level"] == "severe" else qa.answer
        return [_record(qa.question + VIZWIZ, ans, spec, answer=ans, candidates=list(qa.candidates) + ["unanswerable"])]
    if task == "sqa":
        spec = sample_scene(rng, 1, 2)
        qa = ask(spec, "science", rng)
        opts = mc_options(qa, rng, 3 if qa.skill == "sides" else 2)
        letter = LETTERS[opts.index(qa.answer)]
        ctx = SCIENCE_FACTS[qa.skill]
        return [_record(mc_text(task, qa.question, opts, ctx), letter, spec, answer=letter, stem=qa.question,
                        options=opts, answer_index=opts.index(qa.answer), context=ctx)]
    if task == "textvqa":
        spec = sample_sign(rng, "eval")
        qa = _qa(rng, spec, ["number", "number", "number", "sign_color"])
        return [_record(qa.question + SHORT, qa.answer, spec, answer=qa.answer, candidates=list(qa.candidates))]
    if task == "pope":
        spec = sample_scene(rng)
        ans = "yes" if index % 2 == 0 else "no"  # exactly balanced
        qa = None
        while qa is None:
            qa = q_exist(spec, rng, answer=ans, adversarial=index % 4 == 1)
        return [_record(qa.question + SHORT, qa.answer, spec, answer=qa.answer, candidates=["yes", "no"])]
    if task == "mme":
        return _mme_pair(rng, MME_SUBTASKS[index % len(MME_SUBTASKS)], index)
    if task in ("mmbench_en", "mmbench_cn"):
        if rng.random() < 0.25:
            spec = sample_sign(rng, "eval")
            qa = ask(spec, "number", rng)
            qa = QA("What number is written on the sign ?", qa.answer, qa.candidates, qa.sentence, "number")
        else:
            spec = sample_scene(rng)
            qa = _qa(rng, spec, ["color", "shape", "count", "position"])
        opts = mc_options(qa, rng, 4)
        letter = LETTERS[opts.index(qa.answer)]
        return [_record(mc_text(task, qa.question, opts), letter, spec, answer=letter, stem=qa.question,
                        options=opts, answer_index=opts.index(qa.answer))]
    if task == "llavaw":
        spec = sample_scene(rng, 2)
        if rng.random() < 0.5:
            return [_record("Describe the image in detail .", caption(spec), spec, answer=caption(spec))]
        qa = _qa(rng, spec, ["color", "shape", "count", "position", "relation"])
        return [_record(qa.question, qa.sentence, spec, answer=qa.sentence)]
    raise ValueError(f"unknown task {task!r}")


def _mme_pair(rng: random.Random, subtask: str, index: int) -> list[dict]:
    suffix = " Please answer yes or no ."
    pair = f"pair-{index:05d}"
    if subtask == "ocr":
        spec = sample_sign(rng, "eval")
        true = number_text(spec["digits"])
        false = true
        while false == true:
            false = number_text([int(c) for c in str(rng.randint(0, 99))])
        qs = [(f"Is the number {true} written on the sign ?", "yes"), (f"Is the number {false} written on the sign ?", "no")]
    else:
        spec = sample_scene(rng)
        o = rng.choice(spec["objs"])
        if subtask == "existence":
            neg = None
            while neg is None:
                neg = q_exist(spec, rng, answer="no")
            qs = [(f"Is there a {o['color']} {o['shape']} in the image ?", "yes"), (neg.question, "no")]
        elif subtask == "count":
            n = len(spec["objs"])
            wrong = rng.choice([c for c in range(1, 5) if c != n])
            qs = [(f"Are there {n} objects in the image ?", "yes"), (f"Are there {wrong} objects in the image ?", "no")]
        elif subtask == "position":
            wrong = rng.choice([c for c in CELLS if c != o["cell"]])
            name = f"{o['color']} {o['shape']}"
            qs = [(f"Is the {name} at the {o['cell']} ?", "yes"), (f"Is the {name} at the {wrong} ?", "no")]
        else:
            wrong = rng.choice([c for c in COLORS if c != o["color"]])
            ref = f"the object at the {o['cell']}"
            qs = [(f"Is {ref} {o['color']} ?", "yes"), (f"Is {ref} {wrong} ?", "no")]
    return [_record(q + suffix, a, spec, answer=a, candidates=["yes", "no"], subtask=subtask, pair=pair)
            for q, a in qs]


def build_task(task: str, n: int, split: str, seed: int, forbidden: set[str]) -> list[dict]:
    """``n`` items of ``task`` for ``split`` ('val' or 'test'), ids ``<task>-<split>-00000``.

    ``forbidden`` holds spec keys of images already used elsewhere; images used here are added.
    MME counts items as images (two records each).
    """
    from .scenes import spec_key

    rng = random.Random(task_seed(task, split, seed))
    out: list[dict] = []
    index = 0
    while index < n:
        recs = _item(task, rng, index)
        if not recs:
            continue
        key = spec_key(recs[0]["_spec"])
        if key in forbidden:
            continue
        forbidden.add(key)
        for r in recs:
            r["id"] = f"{task}-{split}-{len(out):05d}"
            r["task"] = task
            out.append(r)
        index += 1
    return out

