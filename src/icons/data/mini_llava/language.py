"""Questions, answers and captions about the benchmark's images.

A *skill* looks at an image spec and returns a ``QA(question, answer, candidates, sentence)``,
or None when it does not apply (e.g. a colour question on a sign). ``candidates`` is the set of
answers a guesser would choose from (it defines chance level and multiple-choice distractors);
``sentence`` is the same answer as a full sentence, for conversation-style families.
Pool families and target tasks wrap the same skills in different prompt formats, so a target's
skill is learnable from the pool while its format is not simply copied.
All text is pre-tokenised (spaces around punctuation) for the word-level tokenizer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .scenes import CELLS, COLORS, SHAPES, SIZES

LETTERS = ["A", "B", "C", "D"]


def dotted_options(options: list[str]) -> str:
    """Lettered options as "A . red B . blue": the pool's, the target tasks' and stage-1's generic form."""
    return " ".join(f"{LETTERS[i]} . {o}" for i, o in enumerate(options))

COLOR_NAMES = list(COLORS)
YESNO = ["yes", "no"]
COUNTS = ["1", "2", "3", "4"]
WARM = {"red", "yellow"}
COOL = {"blue", "green", "purple"}
SIDES = {"circle": "0", "triangle": "3", "square": "4", "cross": "12"}
CORNERS = {"circle": "no", "triangle": "yes", "square": "yes", "cross": "yes"}


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    candidates: tuple[str, ...]
    sentence: str
    skill: str = ""


def number_text(digits: list[int]) -> str:
    return " ".join(str(d) for d in digits)


def obj_name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _unique_objs(spec: dict) -> list[dict]:
    names = [obj_name(o) for o in spec["objs"]]
    return [o for o in spec["objs"] if names.count(obj_name(o)) == 1]


# ---------------------------------------------------------------- captions
def caption(spec: dict) -> str:
    kind = spec["kind"]
    if kind == "scene":
        n = len(spec["objs"])
        head = "There is 1 object ." if n == 1 else f"There are {n} objects ."
        parts = [f"A {o['size']} {o['color']} {o['shape']} at the {o['cell']} ." for o in spec["objs"]]
        return " ".join([head] + parts)
    if kind == "sign":
        return f"A {spec['bg']} sign with the number {number_text(spec['digits'])} in {spec['fg']} ."
    if kind == "degraded":
        adj = {"blur": "blurry", "dark": "dark", "noise": "noisy", "rotate": "rotated"}[spec["op"]]
        if spec["level"] == "severe":
            adj = "blurry" if spec["op"] == "rotate" else adj
            return f"The image is too {adj} to see ."
        return f"{caption(spec['base'])} The image is {adj} ."
    raise ValueError(kind)


def short_caption(spec: dict) -> str:
    kind = spec["kind"]
    if kind == "scene":
        n = len(spec["objs"])
        return "A picture of 1 shape ." if n == 1 else f"A picture of {n} shapes ."
    if kind == "sign":
        return f"A {spec['bg']} sign ."
    return "A picture that is hard to see ." if spec["level"] == "severe" else "A picture of low quality ."


# ---------------------------------------------------------------- scene skills
def color_ref(o: dict, objs: list[dict]) -> str:
    """How a colour question names ``o``: by its shape when no other object has it, else by place."""
    if [x["shape"] for x in objs].count(o["shape"]) == 1:
        return f"the {o['shape']}"
    return f"the object at the {o['cell']}"


def q_color(spec, rng):
    objs = spec["objs"]
    o = rng.choice(objs)
    ref = color_ref(o, objs)
    return QA(f"What color is {ref} ?", o["color"], tuple(COLOR_NAMES), f"{ref.capitalize()} is {o['color']} .", "color")


def q_shape(spec, rng):
    objs = spec["objs"]
    o = rng.choice(objs)
    colors = [x["color"] for x in objs]
    if colors.count(o["color"]) == 1:
        q = f"What shape is the {o['color']} object ?"
        s = f"The {o['color']} object is a {o['shape']} ."
    else:
        q = f"What shape is at the {o['cell']} ?"
        s = f"There is a {o['shape']} at the {o['cell']} ."
    return QA(q, o["shape"], tuple(SHAPES), s, "shape")


def q_count(spec, rng):
    n = len(spec["objs"])
    s = "There is 1 object ." if n == 1 else f"There are {n} objects ."
    return QA("How many objects are there ?", str(n), tuple(COUNTS), s, "count")


def q_size(spec, rng):
    objs = _unique_objs(spec)
    if not objs:
        return None
    o = rng.choice(objs)
    return QA(f"Is the {obj_name(o)} large or small ?", o["size"], tuple(SIZES),
              f"The {obj_name(o)} is {o['size']} .", "size")


def _negative(spec, rng, adversarial: bool) -> tuple[str, str] | None:
    present = {(o["color"], o["shape"]) for o in spec["objs"]}
    for _ in range(50):
        if adversarial:  # keep a present shape or colour, change the other: the hard negatives
            o = rng.choice(spec["objs"])
            c, s = (rng.choice(COLOR_NAMES), o["shape"]) if rng.random() < 0.5 else (o["color"], rng.choice(SHAPES))
        else:
            c, s = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
        if (c, s) not in present:
            return c, s
    return None


def q_exist(spec, rng, answer: str | None = None, adversarial: bool | None = None, suffix: str = " ?"):
    answer = answer or rng.choice(YESNO)
    if answer == "yes":
        o = rng.choice(spec["objs"])
        c, s = o["color"], o["shape"]
        sent = f"Yes , there is a {c} {s} ."
    else:
        adv = rng.random() < 0.5 if adversarial is None else adversarial
        neg = _negative(spec, rng, adv)
        if neg is None:
            return None
        c, s = neg
        sent = f"No , there is no {c} {s} ."
    return QA(f"Is there a {c} {s} in the image{suffix}", answer, tuple(YESNO), sent, "exist")


def q_position(spec, rng):
    objs = _unique_objs(spec)
    if not objs:
        return None
    o = rng.choice(objs)
    return QA(f"Where is the {obj_name(o)} ?", o["cell"], tuple(CELLS),
              f"The {obj_name(o)} is at the {o['cell']} .", "position")


def q_what_at(spec, rng):
    cell = rng.choice(CELLS)
    at = [o for o in spec["objs"] if o["cell"] == cell]
    ans = f"a {at[0]['size']} {at[0]['color']} {at[0]['shape']}" if at else "nothing"
    s = f"There is {ans} at the {cell} ." if at else f"There is nothing at the {cell} ."
    return QA(f"What is at the {cell} ?", ans, (), s, "what_at")


_NEIGHBOUR = {  # relation -> (cell -> the cell that stands in that relation to it)
    "to the left of": {"top right": "top left", "bottom right": "bottom left"},
    "to the right of": {"top left": "top right", "bottom left": "bottom right"},
    "above": {"bottom left": "top left", "bottom right": "top right"},
    "below": {"top left": "bottom left", "top right": "bottom right"},
}


def q_relation(spec, rng):
    """GQA-like: an attribute of the object standing in a relation to a named one, or yes/no."""
    objs = _unique_objs(spec)
    by_cell = {o["cell"]: o for o in spec["objs"]}
    options = []
    for o in objs:
        for rel, table in _NEIGHBOUR.items():
            other = by_cell.get(table.get(o["cell"], ""))
            if other is not None:
                options.append((o, rel, other))
    if not options:
        return None
    o, rel, other = rng.choice(options)
    kind = rng.choice(["color", "shape", "yesno"])
    if kind == "color":
        return QA(f"What color is the object {rel} the {obj_name(o)} ?", other["color"], tuple(COLOR_NAMES),
                  f"The object {rel} the {obj_name(o)} is {other['color']} .", "relation")
    if kind == "shape":
        return QA(f"What shape is {rel} the {obj_name(o)} ?", other["shape"], tuple(SHAPES),
                  f"There is a {other['shape']} {rel} the {obj_name(o)} .", "relation")
    # yes/no: is <other> <rel> <o>?  Half the time ask about a wrong relation.
    rels = list(_NEIGHBOUR)
    asked = rel if rng.random() < 0.5 else rng.choice([r for r in rels if r != rel])
    ans = "yes" if asked == rel else "no"
    if obj_name(other) in {obj_name(x) for x in objs}:
        return QA(f"Is the {obj_name(other)} {asked} the {obj_name(o)} ?", ans, tuple(YESNO),
                  f"{ans.capitalize()} , the {obj_name(other)} is {'' if ans == 'yes' else 'not '}{asked} the {obj_name(o)} .".replace("  ", " "),
                  "relation")
    return None


def q_science(spec, rng):
    """Knowledge about the pictured object (ScienceQA-like); needs the image and a fact."""
    objs = spec["objs"]
    o = rng.choice(objs)
    ref = f"the {o['shape']}" if len(objs) == 1 else f"the object at the {o['cell']}"
    kind = rng.choice(["corners", "sides", "warm"] if o["color"] != "white" else ["corners", "sides"])
    if kind == "corners":
        a = CORNERS[o["shape"]]
        return QA(f"Does {ref} have corners ?", a, tuple(YESNO),
                  f"{a.capitalize()} , a {o['shape']} has {'corners' if a == 'yes' else 'no corners'} .", "corners")
    if kind == "sides":
        a = SIDES[o["shape"]]
        return QA(f"How many sides does {ref} have ?", a, tuple(sorted(set(SIDES.values()))),
                  f"A {o['shape']} has {a} sides .", "sides")
    a = "warm" if o["color"] in WARM else "cool"
    return QA(f"Is the color of {ref} warm or cool ?", a, ("warm", "cool"),
              f"{o['color'].capitalize()} is a {a} color .", "warm")


SCIENCE_FACTS = {
    "corners": "A circle has no corners . Squares , triangles and crosses have corners .",
    "sides": "A triangle has 3 sides . A square has 4 sides . A cross has 12 sides . A circle has 0 sides .",
    "warm": "Red and yellow are warm colors . Blue , green and purple are cool colors .",
}

# ---------------------------------------------------------------- sign skills
ALL_NUMBERS = tuple(number_text([int(c) for c in str(n)]) for n in range(100))


def q_number(spec, rng):
    n = number_text(spec["digits"])
    return QA(rng.choice(["What number is written on the sign ?", "What is the number on the sign ?"]),
              n, ALL_NUMBERS, f"The number on the sign is {n} .", "number")


def q_sign_color(spec, rng):
    if rng.random() < 0.5:
        return QA("What color is the sign ?", spec["bg"], tuple(COLOR_NAMES), f"The sign is {spec['bg']} .", "sign_color")
    return QA("What color is the number ?", spec["fg"], tuple(COLOR_NAMES), f"The number is {spec['fg']} .", "text_color")


def q_parity(spec, rng):
    a = "even" if spec["digits"][-1] % 2 == 0 else "odd"
    return QA("Is the number on the sign even or odd ?", a, ("even", "odd"), f"The number is {a} .", "parity")


def q_verify(spec, rng, answer: str | None = None):
    """VQAv2 / GQA verify questions: a stated colour, place, count or sign number, checked yes/no
    (half true, half false). Scenes and signs both."""
    answer = answer or rng.choice(YESNO)
    yes = answer == "yes"
    if spec["kind"] == "sign":
        if rng.random() < 0.7:
            true = number_text(spec["digits"])
            n = true if yes else rng.choice([x for x in ALL_NUMBERS if x != true])
            return QA(f"Is the number {n} written on the sign ?", answer, tuple(YESNO),
                      f"{answer.capitalize()} , the number on the sign is {true} .", "verify_number")
        c = spec["bg"] if yes else rng.choice([x for x in COLOR_NAMES if x != spec["bg"]])
        return QA(f"Is the sign {c} ?", answer, tuple(YESNO), f"{answer.capitalize()} , the sign is {spec['bg']} .",
                  "verify_sign_color")
    objs = spec["objs"]
    kind = rng.choice(["color", "position", "count"])
    if kind == "count":
        n = len(objs)
        k = n if yes else rng.choice([c for c in range(1, 5) if c != n])
        return QA(f"Are there {k} objects in the image ?", answer, tuple(YESNO),
                  f"{answer.capitalize()} , there {'is 1 object' if n == 1 else f'are {n} objects'} .", "verify_count")
    unique = _unique_objs(spec)
    if kind == "position" and unique:
        o = rng.choice(unique)
        cell = o["cell"] if yes else rng.choice([c for c in CELLS if c != o["cell"]])
        return QA(f"Is the {obj_name(o)} at the {cell} ?", answer, tuple(YESNO),
                  f"{answer.capitalize()} , the {obj_name(o)} is at the {o['cell']} .", "verify_position")
    o = rng.choice(objs)
    c = o["color"] if yes else rng.choice([x for x in COLOR_NAMES if x != o["color"]])
    ref = color_ref(o, objs)
    return QA(f"Is {ref} {c} ?", answer, tuple(YESNO), f"{answer.capitalize()} , {ref} is {o['color']} .", "verify_color")


SCENE_SKILLS = {"color": q_color, "shape": q_shape, "count": q_count, "size": q_size, "exist": q_exist,
                "position": q_position, "relation": q_relation}
SIGN_SKILLS = {"number": q_number, "sign_color": q_sign_color}


def ask(spec: dict, skill: str, rng: random.Random) -> QA | None:
    """Apply one skill by name to a (possibly degraded) image spec."""
    table = {**SCENE_SKILLS, **SIGN_SKILLS, "what_at": q_what_at, "science": q_science, "parity": q_parity,
             "verify": q_verify}
    return table[skill](spec, rng)


def skills_for(spec: dict) -> list[str]:
    return list(SCENE_SKILLS) if spec["kind"] == "scene" else list(SIGN_SKILLS)


# ---------------------------------------------------------------- text-only knowledge
def text_only_qa(rng: random.Random) -> tuple[str, str]:
    """ShareGPT-like text chat: arithmetic, comparisons and trivia, no image."""
    kind = rng.choice(["add", "sub", "compare", "sides", "corners", "warm", "next", "parity"])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == "add":
        return f"What is {a} plus {b} ?", f"{a} plus {b} is {number_text([int(c) for c in str(a + b)])} ."
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b} ?", f"{a} minus {b} is {a - b} ."
    if kind == "compare":
        if a == b:
            b = (a + 1) % 10
        return f"Which is larger , {a} or {b} ?", f"{max(a, b)} is larger than {min(a, b)} ."
    if kind == "sides":
        s = rng.choice(SHAPES)
        return f"How many sides does a {s} have ?", f"A {s} has {SIDES[s]} sides ."
    if kind == "corners":
        s = rng.choice(SHAPES)
        return f"Does a {s} have corners ?", f"{CORNERS[s].capitalize()} , a {s} has {'corners' if CORNERS[s] == 'yes' else 'no corners'} ."
    if kind == "warm":
        c = rng.choice(sorted(WARM | COOL))
        w = "warm" if c in WARM else "cool"
        return f"Is {c} a warm color or a cool color ?", f"{c.capitalize()} is a {w} color ."
    if kind == "next":
        return f"What number comes after {a} ?", f"The number after {a} is {number_text([int(c) for c in str(a + 1)])} ."
    p = "even" if a % 2 == 0 else "odd"
    return f"Is {a} even or odd ?", f"{a} is {p} ."
