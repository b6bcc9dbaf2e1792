"""The stage-1 data of the tiny base: what Vicuna + LLaVA's stage-1 projector bring to a 7B run.

A stream of (a) brief-description prompts answered by the image's caption (visual alignment, like
LCS-558K) and, text-only, what a pretrained LLM brings: (b) "Context : <caption> Question : <q>"
chats with several questions about one described scene, so the language model learns to look
facts up in its context before it ever sees the target tasks' formats; (c) choosing among lettered
candidates in a format of its own (not any target task's); (d) repeating a word sequence; (e)
trivia (arithmetic, shape and colour facts). Digits come from the pool's half of the digit images.

Why (d): a 4-layer LM given only (b) stays near "pick any colour mentioned" for 300k examples; the
copy task makes it form induction (look-up) heads within about a thousand steps, and lettered
choices need exactly that look-up (measured while designing stream version 3).
Stream version 4 adds (f) "facts": the same look-up in its simplest form ("Facts : red square .
blue circle . Question : What color is the circle ?"), which a 4-layer LM learns far sooner than
the caption format (it did not carry over: no gain in 12k LM steps, measured on a GPU).
Stream version 5 (phase 0 of the shipped base) makes copying as common as context QA: with half
of the batches copying, a 4-layer LM learns colour look-up in the caption format within 1000 steps
(85%; alone it stays at 52-57% for 6000 steps; experiments/lm_lookup.py --color-lookup caption
--copy 0.5).
Stream version 6 is version 5 with every scene's objects captioned in random order instead of cell
order. A caption in cell order can be read off the image by position alone; in random order, the
shape after "A small red" and the place after "A small red circle" must be found in the image by
content, which is what existence and attribute questions need. Continuing the v5 base on it
for 3000 steps raised that look-up (``python -m icons.models.probe``: lookup_shape 59 -> 77%,
lookup_position 35 -> 63%) and let 6000 existence questions teach POPE (50 -> 67%; docs/findings.md).
Stream version 7 is v6 plus (g) the two-hop choice in the facts form (``two_hop_example``), which a
4-layer LM composes only after about 12k text-only steps (experiments/lm_lookup.py --two-hop), beside
the caption-form choice at a larger share (docs/findings.md).

Stream version 8 is v7 plus (h) verify questions about a described scene or sign ("Context : ...
Question : Is the circle red ?" -> yes/no): checking a stated colour, place, count or number
against the context, what MME's yes/no pairs ask of the language model (full data: MME 41.7 ->
51.9; docs/findings.md).

Stream version 9 is v8 plus (i) multiple choice in several generic letter formats ("Options : A . 4
B . 3 Answer with the letter .", "( A ) red ( B ) blue Which option is right ?", ...) over three
contents: the facts form, science trivia (sides, corners, warm/cool, with or without the facts as
context) and described scenes and signs (``mc_example``). The base's choice was bound to stage-1's own
"Candidates : A = red" format: it answered ScienceQA-style text questions at chance (28.7% with 3
options) in either format. Lettered options are what any pretrained LLM has seen; no target task's
instruction sentence and no image ever comes with a choice in stage-1.

Stream version 10 is v9's mix with half of the text questions about a described scene or sign
given that scene's own image in front ("<image>\nContext : <its caption> Question : ..."; the answer
is still in the text). Any image before a question derailed the v9 base's text skills (sqa's
single-object sides items: 100% right without an image, 41% with its own image); after 4000 steps
of v10 they are 71% with the image, and full data reaches MMBench single pass 37% (v9: 26-30%).
It relaxes v9's rule that no image comes with a question: the answer is always in the text, never
only in the image.

Stream version 11 is v10 plus (j) choices about the image alone: 15% of all examples put a scene or
sign in front of a question with no caption (a science question with its facts as context a quarter
of the time on scenes), answered by a letter among candidates in stage-1's own format
(``seen_choice_example``). A 7B LLM applies its language skills to whatever the projector feeds it;
a 4-layer LM does not: fine-tuned on fresh image multiple-choice items alone, the v9 base reached
MMBench circular 17.5% only after 16k of them (2.5% after 4k), and the pool holds about 1000
(docs/findings.md). It relaxes v10's rule: the answer is now only in the image.
Stream version 12 is v11 with that choice at 20% and in any of MC_FORMATS (v11: stage-1's own
format only), so the "A . x" option layout that the target tasks share with v9's text multiple
choice now also comes with images; still no target task's instruction sentence.

``two_hop_stream`` is the text-only data of the base's ``two_hop`` continuation phase (the
composed choice beside each of its hops and copying); the shipped base is stream v5 from scratch,
then that phase, then stream v7 twice, then streams v8, v9, v10, v11 and v12 (``config.shipped_phases``,
``models.base``).
"""
from __future__ import annotations

import random
from collections.abc import Iterator

from .language import CORNERS, COOL, SCIENCE_FACTS, SIDES, WARM, ask, caption, dotted_options, skills_for, text_only_qa
from .scenes import COLORS, SHAPES, sample_degraded, sample_scene, sample_sign

#: bump when the stream changes: the base recipe (and so the cached base's key) includes it.
#: Every version in TEXT_MIXES can still be generated (a recipe names the one it was made with).
STREAM_VERSION = 5
DESCRIBE_PROMPTS = ("Describe the image briefly .", "What is in the image ?", "Give a brief description of the image .")
CONTEXT_TEMPLATE = "Context : {caption} Question : {question}"
CHOICE_TEMPLATE = "Context : {caption} Question : {question} Candidates : {candidates} . Give the letter ."
COPY_TEMPLATE = "Repeat the words : {words}"
COPY_WORDS = list(COLORS) + SHAPES + ["top", "bottom", "left", "right", "small", "large", "sign", "number",
                                      "object", "yes", "no"] + [str(d) for d in range(10)]
FACTS_TEMPLATE = "Facts : {facts} Question : {question}"
# Shares of the text-only part of the stream, per stream version.
TEXT_MIXES = {3: {"context_qa": 0.6, "choice": 0.16, "copy": 0.14, "trivia": 0.10},
              4: {"context_qa": 0.5, "facts": 0.1, "choice": 0.16, "copy": 0.14, "trivia": 0.10},
              5: {"context_qa": 0.45, "copy": 0.45, "choice": 0.05, "trivia": 0.05}}
TEXT_MIXES[6] = TEXT_MIXES[5]  # v6 changes the captions' object order, not the mix
# v7: v6's captions; the two-hop choice in both forms (facts and captions) beside its first hop
TEXT_MIXES[7] = {"context_qa": 0.3, "copy": 0.25, "choice": 0.2, "two_hop": 0.15, "facts": 0.1}
# v8: v7 plus (h) verify questions about a described scene or sign ("Is the circle red ?"): checking
# a stated attribute against the context, what MME's yes/no pairs ask of the language model
TEXT_MIXES[8] = {"context_qa": 0.2, "verify": 0.15, "copy": 0.2, "choice": 0.15, "two_hop": 0.15, "facts": 0.1,
                 "trivia": 0.05}
# v9: v8 plus (i) multiple choice in generic letter formats over facts, science trivia and scenes
TEXT_MIXES[9] = {"context_qa": 0.15, "verify": 0.15, "copy": 0.15, "choice": 0.05, "two_hop": 0.05, "facts": 0.05,
                 "trivia": 0.05, "mc": 0.35}
# v10: v9's mix; half of the questions about a described scene or sign come with its image in front
TEXT_MIXES[10] = TEXT_MIXES[9]
#: the first stream version whose text questions may come with the described image in front
IMAGE_CONTEXT_VERSION = 10
# v11: v10's mix; beside it, SEEN_CHOICE_SHARE of all examples ask about the image alone (no caption),
# answered by a letter among candidates in stage-1's own format (``seen_choice_example``)
TEXT_MIXES[11] = TEXT_MIXES[10]
SEEN_CHOICE_VERSION = 11
SEEN_CHOICE_SHARE = {11: 0.15, 12: 0.2}  # per stream version that has the choice about the image
# v12: v11 with the choice about the image in any of MC_FORMATS (v11: stage-1's own format only)
TEXT_MIXES[12] = TEXT_MIXES[11]
#: the first stream version whose captions list a scene's objects in random order
RANDOM_ORDER_VERSION = 6


def _scene(rng: random.Random, version: int) -> dict:
    spec = sample_scene(rng)
    if version >= RANDOM_ORDER_VERSION:
        rng.shuffle(spec["objs"])  # render() ignores the order; caption() follows it
    return spec


def _described(rng: random.Random, version: int) -> dict:
    """The scene (3 in 4) or sign a text-only question's context describes."""
    return _scene(rng, version) if rng.random() < 0.75 else sample_sign(rng, "train")


def _image_spec(rng: random.Random, version: int) -> dict:
    u = rng.random()
    if u < 0.55:
        return _scene(rng, version)
    if u < 0.9:
        return sample_sign(rng, "train")
    return sample_degraded(rng, "train", severe=rng.random() < 0.4)


def _any_qa(rng: random.Random, spec: dict):
    qa = None
    while qa is None:
        qa = ask(spec, rng.choice(skills_for(spec)), rng)
    return qa


def _text(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def copy_example(rng: random.Random) -> list[dict]:
    """Repeat 3-12 words: the task that makes a small LM form look-up (induction) heads."""
    words = " ".join(rng.choice(COPY_WORDS) for _ in range(rng.randint(3, 12)))
    return _text(COPY_TEMPLATE.format(words=words), words)


def candidates(options: list[str]) -> str:
    """Lettered candidates in stage-1's own format ("A = red ; B = blue"), not any target task's."""
    return " ; ".join(f"{'ABCD'[i]} = {o}" for i, o in enumerate(options))


def count_candidates(prompt: str) -> int:
    """How many lettered candidates a prompt built with ``candidates`` offers."""
    return prompt.count(" = ")


#: Generic lettered-option formats of stream v9's multiple choice (none is a target task's prompt).
MC_FORMATS = (
    lambda opts: f"Candidates : {candidates(opts)} . Give the letter .",  # stage-1's own (choice, two-hop)
    lambda opts: f"Options : {dotted_options(opts)} Answer with the letter .",
    lambda opts: " ".join(f"( {'ABCD'[i]} ) {o}" for i, o in enumerate(opts)) + " Which option is right ?",
    lambda opts: f"Choices : {dotted_options(opts)} Reply with the letter .",
)


def _lettered(rng: random.Random, answer: str, pool) -> list[str]:
    """The answer among 1-3 other words of ``pool``, shuffled: the options of every stage-1 choice."""
    others = [w for w in pool if w != answer]
    opts = rng.sample(others, min(len(others), rng.randint(1, 3))) + [answer]
    rng.shuffle(opts)
    return opts


def _facts_content(rng: random.Random) -> tuple[str, str, str, list[str], None]:
    """(context, question, answer, word pool, no image): one of 2-4 stated facts asked about."""
    n = rng.randint(2, 4)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    context = "Facts : " + " ".join(f"{c} {s} ." for c, s in zip(colors, shapes))
    k = rng.randrange(n)
    if rng.random() < 0.5:
        return context, f"What color is the {shapes[k]} ?", colors[k], list(COLORS), None
    return context, f"What shape is the {colors[k]} object ?", shapes[k], SHAPES, None


def choice_example(rng: random.Random, spec: dict) -> list[dict]:
    """Two look-ups composed: the answer in the described scene, then its letter among 2-4
    candidates (what MMBench and SQA ask of the language model, in stage-1's own format)."""
    qa = _any_qa(rng, spec)
    opts = _lettered(rng, qa.answer, qa.candidates)
    return _text(CHOICE_TEMPLATE.format(caption=caption(spec), question=qa.question, candidates=candidates(opts)),
                 "ABCD"[opts.index(qa.answer)])


def facts_example(rng: random.Random) -> list[dict]:
    """The simplest look-up: 1-4 objects of distinct shapes and colours, one asked about."""
    n = rng.randint(1, 4)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    facts = " ".join(f"{c} {s} ." for c, s in zip(colors, shapes))
    k = rng.randrange(n)
    if rng.random() < 0.5:
        return _text(FACTS_TEMPLATE.format(facts=facts, question=f"What color is the {shapes[k]} ?"), colors[k])
    return _text(FACTS_TEMPLATE.format(facts=facts, question=f"What shape is the {colors[k]} object ?"), shapes[k])


def two_hop_example(rng: random.Random) -> list[dict]:
    """Both hops of a multiple-choice answer in the simplest text form: the answer among 2-4 facts,
    then its letter among 2-4 candidates in stage-1's format ("Facts : red square . blue circle .
    Question : What color is the circle ? Candidates : A = blue ; B = red . Give the letter .")."""
    context, question, answer, pool, _ = _facts_content(rng)
    opts = _lettered(rng, answer, pool)
    return _text(f"{context} Question : {question} {MC_FORMATS[0](opts)}", "ABCD"[opts.index(answer)])


LETTER_WORDS = list(COLORS) + SHAPES + [str(d) for d in range(10)] + ["yes", "no", "left", "right", "small", "large"]


def letter_lookup_example(rng: random.Random) -> list[dict]:
    """The second hop of a multiple-choice answer alone: the letter of a named candidate."""
    opts = rng.sample(LETTER_WORDS, rng.randint(2, 4))
    k = rng.randrange(len(opts))
    return _text(f"Candidates : {candidates(opts)} . Which letter is {opts[k]} ?", "ABCD"[k])


def _science_content(rng: random.Random) -> tuple[str, str, str, list[str], None]:
    kind = rng.choice(["sides", "corners", "warm"])
    context = f"Context : {SCIENCE_FACTS[kind]}" if rng.random() < 0.7 else ""
    if kind == "sides":
        s = rng.choice(SHAPES)
        return context, f"How many sides does the {s} have ?", SIDES[s], sorted(set(SIDES.values())), None
    if kind == "corners":
        s = rng.choice(SHAPES)
        return context, f"Does the {s} have corners ?", CORNERS[s], ["yes", "no"], None
    c = rng.choice(sorted(WARM | COOL))
    return context, f"Is the color {c} warm or cool ?", "warm" if c in WARM else "cool", ["warm", "cool"], None


def _scene_content(rng: random.Random) -> tuple[str, str, str, list[str], dict]:
    spec = _described(rng, 9)
    qa = _any_qa(rng, spec)
    return f"Context : {caption(spec)}", qa.question, qa.answer, list(qa.candidates), spec


def mc_example(rng: random.Random) -> list[dict]:
    """Stream v9's multiple choice: a question about facts, science trivia or a described scene or sign,
    its answer among 2-4 lettered options in one of MC_FORMATS, answered by the letter."""
    return _mc_and_spec(rng)[0]


def _mc_and_spec(rng: random.Random) -> tuple[list[dict], dict | None]:
    content = rng.choice([_facts_content, _science_content, _science_content, _scene_content])
    context, question, answer, pool, spec = content(rng)
    opts = _lettered(rng, answer, pool)
    prompt = f"{context} Question : {question} {rng.choice(MC_FORMATS)(opts)}".strip()
    return _text(prompt, "ABCD"[opts.index(answer)]), spec


#: The text-only two-hop phase (``PhaseConfig(kind="two_hop")``): the composed task beside both of
#: its hops and copying, so that a failure of the composition is not a failure of a missing hop.
TWO_HOP_MIX = {"two_hop": 0.3, "facts": 0.3, "letter": 0.2, "copy": 0.2}
_TWO_HOP_KINDS = {"two_hop": two_hop_example, "facts": facts_example, "letter": letter_lookup_example,
                  "copy": copy_example}


def two_hop_stream(seed: int) -> Iterator[dict]:
    """Text-only records of TWO_HOP_MIX. A 4-layer LM composes the two hops only after about 12k
    steps (chance until 10k, then 96 / 82 / 71% for 2 / 3 / 4 candidates at 20k: docs/findings.md)."""
    rng = random.Random(seed)
    while True:
        kind = rng.choices(list(TWO_HOP_MIX), list(TWO_HOP_MIX.values()))[0]
        yield {"_spec": None, "conversations": _TWO_HOP_KINDS[kind](rng)}


def text_example(rng: random.Random, version: int = STREAM_VERSION) -> list[dict]:
    """One text-only stage-1 conversation (the 'pretrained LLM' part of the stream)."""
    return _text_and_spec(rng, version)[0]


#: The pool's passage questions (``families.make_record('text_only')``): stage-1's text questions
#: about a described scene or sign (answer, yes/no check, lettered choice), as ShareGPT chat holds
#: reading comprehension and quizzes. Stream v9's captions and letter formats.
PASSAGE_MIX = {"context_qa": 0.35, "verify": 0.25, "mc": 0.3, "choice": 0.1}


def passage_example(rng: random.Random) -> list[dict]:
    """One text-only question (or several) about a given passage, in PASSAGE_MIX's kinds."""
    return _text_and_spec(rng, 9, PASSAGE_MIX)[0]


def _text_and_spec(rng: random.Random, version: int, mix: dict[str, float] | None = None) -> tuple[list[dict], dict | None]:
    """A text-only conversation and the scene or sign its context describes (None: facts, trivia...).
    ``mix``: the kinds' weights (None: the stream version's TEXT_MIXES)."""
    mix = TEXT_MIXES[version] if mix is None else mix
    kind = rng.choices(list(mix), list(mix.values()))[0]
    if kind == "facts":
        return facts_example(rng), None
    if kind == "two_hop":
        return two_hop_example(rng), None
    if kind == "trivia":
        return _text(*text_only_qa(rng)), None
    if kind == "mc":
        return _mc_and_spec(rng)
    if kind == "copy":
        return copy_example(rng), None
    spec = _described(rng, version)
    if kind == "choice":
        return choice_example(rng, spec), spec
    if kind == "verify":
        qa = ask(spec, "verify", rng)
        return _text(CONTEXT_TEMPLATE.format(caption=caption(spec), question=qa.question), qa.answer), spec
    turns = []
    for k in range(rng.randint(1, 4)):  # several questions about one described scene
        qa = _any_qa(rng, spec)
        q = CONTEXT_TEMPLATE.format(caption=caption(spec), question=qa.question) if k == 0 else f"Question : {qa.question}"
        turns += _text(q, qa.answer)
    return turns, spec


def seen_choice_example(rng: random.Random, version: int = SEEN_CHOICE_VERSION) -> dict:
    """Streams v11 and v12's choice about the image itself: a question about the pictured scene or
    sign (a science question with its facts as context 70% of the time), no caption, its answer
    among 2-4 candidates in stage-1's own format ("Candidates : A = red ; B = blue . Give the
    letter ."; v12: any of MC_FORMATS)."""
    spec = _described(rng, version)
    context = ""
    if spec["kind"] == "scene" and rng.random() < 0.25:
        qa = ask(spec, "science", rng)
        context = f"Context : {SCIENCE_FACTS[qa.skill]} " if rng.random() < 0.7 else ""
    else:
        qa = _any_qa(rng, spec)
    opts = _lettered(rng, qa.answer, qa.candidates)
    fmt = MC_FORMATS[0] if version == SEEN_CHOICE_VERSION else rng.choice(MC_FORMATS)
    prompt = f"<image>\n{context}Question : {qa.question} {fmt(opts)}"
    return {"_spec": spec, "conversations": _text(prompt, "ABCD"[opts.index(qa.answer)])}


def base_example(rng: random.Random, text_qa_fraction: float, version: int = STREAM_VERSION) -> dict:
    """One stage-1 example as a LLaVA record with an image spec in '_spec' (None if text-only)."""
    # a text-only phase (text_qa_fraction 1, e.g. lm_examples) never gets an image
    if version in SEEN_CHOICE_SHARE and text_qa_fraction < 1.0 and rng.random() < SEEN_CHOICE_SHARE[version]:
        return seen_choice_example(rng, version)
    if rng.random() < text_qa_fraction:
        conv, spec = _text_and_spec(rng, version)
        if version >= IMAGE_CONTEXT_VERSION and spec is not None and rng.random() < 0.5:
            # the described scene's own image in front; the answer is still in the text
            conv[0] = {"from": "human", "value": "<image>\n" + conv[0]["value"]}
            return {"_spec": spec, "conversations": conv}
        return {"_spec": None, "conversations": conv}
    spec = _image_spec(rng, version)
    return {"_spec": spec, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(DESCRIBE_PROMPTS)},
        {"from": "gpt", "value": caption(spec)}]}


def base_stream(seed: int, text_qa_fraction: float, version: int = STREAM_VERSION,
                lm_examples: int = 0) -> Iterator[dict]:
    """The stage-1 stream: ``lm_examples`` text-only examples first (a language-model phase, as
    Vicuna is a trained LLM before LLaVA's stage 1), then the mixed stream."""
    if version not in TEXT_MIXES:
        raise ValueError(f"unknown stage-1 stream version {version}; known: {sorted(TEXT_MIXES)}")
    rng = random.Random(seed)
    for _ in range(lm_examples):
        yield base_example(rng, 1.0, version)
    while True:
        yield base_example(rng, text_qa_fraction, version)
