"""What a tiny base knows, word by word: the diagnostic behind the benchmark's known limit.

Two teacher-forced measurements on fresh held-out items (nothing is generated, so a wrong early
token cannot hide a right later one):
- ``caption_<kind>``: share of caption words of each kind (colour, shape, size, position, digit)
  predicted right from the image: does the vision side see?
- ``context_<skill>``: share of text-only "Context : <caption> Question : <q>" items whose whole
  answer is predicted right: can the language model look facts up in its context?

``python -m icons.models.probe [checkpoint_dir]`` prints both for the shipped base by default.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from ..data.encode import IGNORE, Encoder, collate
from ..data.mini_llava.language import ask, caption, skills_for
from ..data.mini_llava.pretraining import CONTEXT_TEMPLATE
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


@torch.no_grad()
def probe(model, tok, n: int = 300, seed: int = 999, batch_size: int = 100) -> dict[str, float]:
    """{'caption_color': %, ..., 'context_color': %, ...} on ``n`` fresh items of each kind."""
    image_size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    enc = Encoder(tok, tiny_llava.n_image_tokens(image_size, patch), image_size, max_length=256)
    rng = random.Random(seed)
    context, captions = [], []
    while len(context) < n:
        spec = sample_scene(rng) if rng.random() < 0.85 else sample_sign(rng, "eval")
        skill = rng.choice(skills_for(spec))
        qa = ask(spec, skill, rng)
        if qa is not None:
            q = CONTEXT_TEMPLATE.format(caption=caption(spec), question=qa.question)
            context.append((skill, enc.encode({"conversations": [{"from": "human", "value": q},
                                                                 {"from": "gpt", "value": qa.answer}]})))
    for i in range(n):
        spec = sample_scene(rng) if i % 3 else sample_sign(rng, "eval")
        rec = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly ."},
                                 {"from": "gpt", "value": caption(spec)}]}
        captions.append(enc.encode(rec, pixels=tiny_llava.pixels_uint8(render(spec), image_size)))
    kinds = _word_kinds(tok)
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()

    def predicted(items):
        batch = collate(items, tok.pad_token_id)
        labels = batch.pop("labels")[:, 1:]
        return model(**batch).logits[:, :-1].argmax(-1), labels

    for s in range(0, n, batch_size):
        pred, labels = predicted([e for _, e in context[s:s + batch_size]])
        whole = ((pred == labels) | (labels == IGNORE)).all(1)
        for (skill, _), ok in zip(context[s:s + batch_size], whole.tolist()):
            hits[f"context_{skill}"].append(ok)
        pred, labels = predicted(captions[s:s + batch_size])
        for p, t in zip(pred.flatten().tolist(), labels.flatten().tolist()):
            if t in kinds:
                hits[f"caption_{kinds[t]}"].append(p == t)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}


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
