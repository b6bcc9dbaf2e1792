"""What a tiny base knows, word by word: the diagnostic behind the benchmark's known limit.

Four teacher-forced measurements on fresh held-out items (nothing is generated, so a wrong early
token cannot hide a right later one):
- ``caption_<kind>``: share of caption words of each kind (colour, shape, size, position, digit)
  predicted right from the image: does the vision side see?
- ``lookup_<shape|position>``: the same, on captions of 2-4 objects listed in random order, for
  the words fixed by what the caption has already said (the shape of "a small red ...", the place
  of "a small red circle ..."; objects whose earlier words are shared are skipped). Captions in
  cell order can be read off the image by position alone; these words need the language model to
  find an object in the image by its content, as existence and attribute questions do.
- ``context_<skill>``: share of text-only "Context : <caption> Question : <q>" items whose whole
  answer is predicted right: can the language model look facts up in its context?
- ``choice_<n>``: the same with ``n`` lettered candidates (stage-1's "choice" task; chance 1/n):
  can it compose that look-up with a second one, the answer's letter, as multiple choice needs?

``python -m icons.models.probe [checkpoint_dir]`` prints them all for the shipped base by default.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from ..data.encode import IGNORE, Encoder, collate
from ..data.mini_llava.language import ask, caption, skills_for
from ..data.mini_llava.pretraining import CONTEXT_TEMPLATE, choice_example, count_candidates
from ..data.mini_llava.scenes import CELLS, COLORS, SHAPES, SIZES, render, sample_scene, sample_sign
from . import tiny_llava


def _word_kinds(tok) -> dict[int, str]:
    kinds = {}
    for kind, words in (("color", list(COLORS)), ("shape", SHAPES), ("size", list(SIZES)),
                        ("position", sorted({w for c in CELLS for w in c.split()})),
                        ("digit", [str(d) for d in range(10)])):
        for w in words:
            kinds[tok.convert_tokens_to_ids(w)] = kind
    return kinds


def context_items(enc: Encoder, n: int, rng: random.Random) -> list[tuple[str, object]]:
    """``n`` text-only "Context : <caption> Question : <q>" items as (skill, encoded)."""
    items = []
    while len(items) < n:
        spec = sample_scene(rng) if rng.random() < 0.85 else sample_sign(rng, "eval")
        skill = rng.choice(skills_for(spec))
        qa = ask(spec, skill, rng)
        if qa is not None:
            q = CONTEXT_TEMPLATE.format(caption=caption(spec), question=qa.question)
            items.append((skill, enc.encode({"conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": qa.answer}]})))
    return items


def choice_items(enc: Encoder, n: int, rng: random.Random) -> list[tuple[str, object]]:
    """``n`` text-only stage-1 "choice" items as ('choice_<#candidates>', encoded)."""
    items = []
    for _ in range(n):
        spec = sample_scene(rng) if rng.random() < 0.75 else sample_sign(rng, "eval")
        conv = choice_example(rng, spec)
        items.append((f"choice_{count_candidates(conv[0]['value'])}", enc.encode({"conversations": conv})))
    return items


def lookup_item(enc: Encoder, rng: random.Random):
    """A scene of 2-4 objects captioned in random object order, with the answer words to score:
    (encoded item, [(kind, answer word indices)]): kind 'shape' (one word) or 'position' (the
    cell's two words, right only together)."""
    spec = sample_scene(rng, 2, 4)
    rng.shuffle(spec["objs"])  # rendering ignores the order; the caption follows it
    words = caption(spec).split()
    scored, i = [], words.index(".") + 1  # after "There are N objects ."
    objs = spec["objs"]
    for o in objs:  # "A <size> <color> <shape> at the <cell words> ."
        n_cell = len(o["cell"].split())
        if sum((x["size"], x["color"]) == (o["size"], o["color"]) for x in objs) == 1:
            scored.append(("shape", [i + 3]))
        if sum((x["size"], x["color"], x["shape"]) == (o["size"], o["color"], o["shape"]) for x in objs) == 1:
            scored.append(("position", [i + 6 + k for k in range(n_cell)]))
        i += 7 + n_cell
    rec = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly ."},
                             {"from": "gpt", "value": " ".join(words)}]}
    return enc.encode(rec, pixels=tiny_llava.pixels_uint8(render(spec), enc.image_size)), scored


def _predicted(model, tok, items):
    batch = collate(items, tok.pad_token_id)
    device = next(model.parameters()).device
    labels = batch.pop("labels")[:, 1:].to(device)
    return model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].argmax(-1), labels


@torch.no_grad()
def context_accuracy(model, tok, items, batch_size: int = 100, prefix: str = "context_") -> dict[str, float]:
    """{'<prefix><skill>': % of items whose whole answer is predicted right (teacher-forced)}."""
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        pred, labels = _predicted(model, tok, [e for _, e in chunk])
        whole = ((pred == labels) | (labels == IGNORE)).all(1)
        for (skill, _), ok in zip(chunk, whole.tolist()):
            hits[f"{prefix}{skill}"].append(ok)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}


@torch.no_grad()
def probe(model, tok, n: int = 300, seed: int = 999, batch_size: int = 100) -> dict[str, float]:
    """{'caption_color': %, ..., 'lookup_shape': %, ..., 'context_color': %, ..., 'choice_2': %, ...}
    on ``n`` fresh items of each kind."""
    image_size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    enc = Encoder(tok, tiny_llava.n_image_tokens(image_size, patch), image_size, max_length=256)
    rng = random.Random(seed)
    context = context_items(enc, n, rng)
    captions = []
    for i in range(n):
        spec = sample_scene(rng) if i % 3 else sample_sign(rng, "eval")
        rec = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly ."},
                                 {"from": "gpt", "value": caption(spec)}]}
        captions.append(enc.encode(rec, pixels=tiny_llava.pixels_uint8(render(spec), image_size)))
    kinds = _word_kinds(tok)
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    for s in range(0, n, batch_size):
        pred, labels = _predicted(model, tok, captions[s:s + batch_size])
        for p, t in zip(pred.flatten().tolist(), labels.flatten().tolist()):
            if t in kinds:
                hits[f"caption_{kinds[t]}"].append(p == t)
    lookups = [lookup_item(enc, rng) for _ in range(n)]
    for s in range(0, n, batch_size):
        chunk = lookups[s:s + batch_size]
        pred, labels = _predicted(model, tok, [e for e, _ in chunk])
        for row, (_, scored) in enumerate(chunk):
            answer = (labels[row] != IGNORE).nonzero().flatten().tolist()  # answer word j at answer[j]
            for kind, words in scored:
                at = [answer[j] for j in words]
                hits[f"lookup_{kind}"].append(bool((pred[row, at] == labels[row, at]).all()))
    out = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}
    choices = choice_items(enc, n, rng)
    return {**out, **context_accuracy(model, tok, context, batch_size),
            **context_accuracy(model, tok, choices, batch_size, prefix="")}


def main(argv=None) -> None:
    from .base import ASSET

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=str(ASSET))
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    model, tok = tiny_llava.load(a.checkpoint)
    for k, v in probe(model, tok, a.n).items():
        print(f"{k:22s} {v:5.1f}")


if __name__ == "__main__":
    main()
