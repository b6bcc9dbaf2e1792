"""Can the tiny base's language model look facts up in its context? A learning-curve probe.

Trains only the language side of a fresh tiny LLaVA (text-only stage-1 stream, no images) and
prints, every ``--eval-every`` steps, one JSON line with the teacher-forced context-QA accuracies
of ``icons.models.probe`` (colour, shape, position, relation, ... looked up in a caption given as
text). This is the diagnostic behind issue #2's foundation bar: a base whose LM cannot do this
look-up answers POPE, MMBench and GQA near chance however it is fine-tuned.

    python experiments/lm_lookup.py --stream 4 --steps 20000 --device cuda --out curve.jsonl

Variants: ``--stream`` (text mix version, see data/mini_llava/pretraining.py), ``--loss``
(token_mean | example_mean), ``--lr``, ``--layers``, ``--heads``, ``--hidden``, ``--batch-size``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch


def main(argv=None) -> None:
    from icons.data.encode import Encoder
    from icons.data.mini_llava import tokenizer_corpus
    from icons.data.mini_llava.pretraining import STREAM_VERSION, TEXT_MIXES, base_stream
    from icons.data.mini_llava.scenes import render
    from icons.features.grads import per_example_loss
    from icons.models import tiny_llava
    from icons.models.probe import context_accuracy, context_items
    from icons.train import StreamedBatches, lr_factor

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
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    tok = tiny_llava.build_tokenizer(tokenizer_corpus())
    model = tiny_llava.build_model(tok, text_hidden=a.hidden, text_layers=a.layers, text_heads=a.heads,
                                   seed=a.seed).to(a.device)
    enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 160)
    held_out = context_items(enc, a.eval_n, random.Random(999))
    batches = StreamedBatches(base_stream(a.seed, 1.0, a.stream), enc, a.batch_size, a.steps, render)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.steps, 0.02, "cosine"))
    label = {("objective" if k == "loss" else k): v for k, v in vars(a).items() if k not in ("out", "device", "eval_n")}
    t0, recent = time.time(), []
    for step, batch in enumerate(batches, 1):
        model.train()
        batch = {k: v.to(a.device) for k, v in batch.items()}
        if a.loss == "token_mean":
            loss = model(**batch).loss
        else:
            labels = batch.pop("labels")
            loss = per_example_loss(model(**batch).logits, labels).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.detach())
        if step % a.eval_every == 0 or step == a.steps:
            acc = context_accuracy(model, tok, held_out)
            line = json.dumps({**label, "step": step, "loss": round(float(torch.stack(recent).mean()), 4),
                               "s": round(time.time() - t0, 1), **acc,
                               "mean": round(sum(acc.values()) / len(acc), 1)})
            recent.clear()
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
