"""Can the tiny base's language model look facts up in its context? A learning-curve probe.

Trains only the language side of a fresh tiny LLaVA (text-only stage-1 stream, no images) and
prints, every ``--eval-every`` steps, one JSON line with the teacher-forced context-QA accuracies
of ``icons.models.probe`` (colour, shape, position, relation, ... looked up in a caption given as
text). This is the diagnostic behind the miniature benchmark's bar (issue #2): a base whose LM
cannot do this look-up answers POPE, MMBench and GQA near chance however it is fine-tuned.

    python experiments/lm_lookup.py --stream 4 --steps 20000 --device cuda --out curve.jsonl

Variants: ``--stream`` (text mix version, see data/mini_llava/pretraining.py), ``--loss``
(token_mean | example_mean), ``--lr``, ``--layers``, ``--heads``, ``--hidden``, ``--batch-size``.

``--color-lookup FORMAT`` trains on one skill instead: "What color is the <shape> ?" about 2-4
objects of distinct shapes described in FORMAT (``caption``: the benchmark's captions; ``simple``:
"A red square ."), mixed with ``--copy`` of the copy task, and reports ``color_lookup`` accuracy.

``--letter-lookup`` trains the second hop of a multiple-choice answer alone ("Candidates : A = red ;
B = blue . Which letter is blue ?"); ``--two-hop`` trains both hops composed ("Facts : red square .
blue circle . Question : What color is the circle ? Candidates : A = blue ; B = red . Give the
letter .") beside each hop alone and copying (pretraining.TWO_HOP_MIX: the base's ``two_hop``
phase, the same loop, ``models.base.lm_phase``); ``--init`` starts from a checkpoint; ``--save DIR``
keeps the trained model.

Measured curves (colour look-up with and without copying, the letter look-up, the two-hop
composition): docs/findings.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch


def color_lookup_record(rng: random.Random, fmt: str) -> dict:
    """A text-only "What color is the <shape> ?" record about 2-4 objects of distinct shapes."""
    from icons.data.mini_llava.language import caption
    from icons.data.mini_llava.scenes import sample_scene

    while True:
        spec = sample_scene(rng, 2, 4)
        shapes = [o["shape"] for o in spec["objs"]]
        if len(set(shapes)) == len(shapes):
            break
    o = rng.choice(spec["objs"])
    context = caption(spec) if fmt == "caption" else " ".join(f"A {x['color']} {x['shape']} ." for x in spec["objs"])
    return {"_spec": None, "conversations": [
        {"from": "human", "value": f"Context : {context} Question : What color is the {o['shape']} ?"},
        {"from": "gpt", "value": o["color"]}]}


def letter_lookup_record(rng: random.Random) -> dict:
    """The second hop of a multiple-choice answer alone: the letter of a named candidate."""
    from icons.data.mini_llava.pretraining import letter_lookup_example

    return {"_spec": None, "conversations": letter_lookup_example(rng)}


def two_hop_record(rng: random.Random) -> tuple[dict, int]:
    """Both hops of a multiple-choice answer in the simplest text form (stage-1's two_hop_example):
    (record, #candidates)."""
    from icons.data.mini_llava.pretraining import count_candidates, two_hop_example

    conv = two_hop_example(rng)
    return {"_spec": None, "conversations": conv}, count_candidates(conv[0]["value"])


def two_hop_held_out(enc, n: int) -> list[tuple[str, object]]:
    """Held-out items labelled two_hop_<#candidates> (chance 1/#), facts (the first hop alone) and
    letter (the second hop alone)."""
    from icons.data.mini_llava.pretraining import facts_example

    items = []
    for i in range(n):
        rec, m = two_hop_record(random.Random(10_000 + i))
        items.append((f"two_hop_{m}", enc.encode(rec)))
        facts = facts_example(random.Random(20_000 + i))
        items.append(("facts", enc.encode({"_spec": None, "conversations": facts})))
        items.append(("letter", enc.encode(letter_lookup_record(random.Random(30_000 + i)))))
    return items


def lookup_stream(seed: int, record, copy: float):
    from icons.data.mini_llava.pretraining import copy_example

    rng = random.Random(seed)
    while True:
        if rng.random() < copy:
            yield {"_spec": None, "conversations": copy_example(rng)}
        else:
            yield record(rng)


def main(argv=None) -> None:
    from icons.data.encode import Encoder
    from icons.data.mini_llava import tokenizer_corpus
    from icons.data.mini_llava.pretraining import STREAM_VERSION, TEXT_MIXES, base_stream, two_hop_stream
    from icons.data.mini_llava.scenes import render
    from icons.models import tiny_llava
    from icons.models.base import lm_phase
    from icons.models.probe import context_accuracy, context_items
    from icons.train import StreamedBatches

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", type=int, default=STREAM_VERSION, choices=sorted(TEXT_MIXES))
    ap.add_argument("--loss", default="token_mean", choices=["token_mean", "example_mean"])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--color-lookup", default=None, choices=["caption", "simple"],
                    help="train on colour look-up questions in this format only (plus --copy)")
    ap.add_argument("--letter-lookup", action="store_true",
                    help="train on 'Candidates : A = red ; B = blue . Which letter is blue ?' only (plus --copy)")
    ap.add_argument("--two-hop", action="store_true",
                    help="train on facts -> lettered candidates ('two_hop_<n>') beside both hops and copying")
    ap.add_argument("--copy", type=float, default=0.0, help="share of copy-task examples with --color/letter-lookup")
    ap.add_argument("--init", default=None, help="start from this tiny checkpoint (e.g. the shipped base) instead of a fresh model")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--save", default=None, help="save the trained model (a tiny checkpoint) to this directory")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    if a.init:
        model, tok = tiny_llava.load(a.init)
        model = model.to(a.device)
    else:
        tok = tiny_llava.build_tokenizer(tokenizer_corpus())
        model = tiny_llava.build_model(tok, text_hidden=a.hidden, text_layers=a.layers, text_heads=a.heads,
                                       seed=a.seed).to(a.device)
    vc = model.config.vision_config
    enc = Encoder(tok, tiny_llava.n_image_tokens(vc.image_size, vc.patch_size), vc.image_size, 160)
    if a.color_lookup:
        held_out = [("color_lookup", enc.encode(color_lookup_record(random.Random(10_000 + i), a.color_lookup)))
                    for i in range(a.eval_n)]
        stream = lookup_stream(a.seed, lambda rng: color_lookup_record(rng, a.color_lookup), a.copy)
    elif a.letter_lookup:
        held_out = [("letter_lookup", enc.encode(letter_lookup_record(random.Random(10_000 + i)))) for i in range(a.eval_n)]
        stream = lookup_stream(a.seed, letter_lookup_record, a.copy)
    elif a.two_hop:
        held_out = two_hop_held_out(enc, a.eval_n)
        stream = two_hop_stream(a.seed)
    else:
        held_out = context_items(enc, a.eval_n, random.Random(999))
        stream = base_stream(a.seed, 1.0, a.stream)
    batches = StreamedBatches(stream, enc, a.batch_size, a.steps, render)
    label = {("objective" if k == "loss" else k): v for k, v in vars(a).items()
             if k not in ("out", "save", "device", "eval_n")}
    t0, recent = time.time(), []

    def evaluate(step: int, loss: float) -> None:
        recent.append(loss)
        if step % a.eval_every == 0 or step == a.steps:
            acc = context_accuracy(model, tok, held_out)
            line = json.dumps({**label, "step": step, "loss": round(sum(recent) / len(recent), 4),
                               "s": round(time.time() - t0, 1), **acc,
                               "mean": round(sum(acc.values()) / len(acc), 1)})
            recent.clear()
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")

    lm_phase(model, batches, a.lr, a.seed, a.device, a.loss, on_step=evaluate)
    if a.save:
        tiny_llava.save(model.cpu(), tok, a.save, vc.image_size, vc.patch_size)


if __name__ == "__main__":
    sys.exit(main())
