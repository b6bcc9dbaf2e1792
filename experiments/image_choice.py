"""How many image multiple-choice examples does a base need? A learning-curve probe.

Fine-tunes a base (projector + language model; the vision tower frozen, as ``train.mode=full``) on
multiple-choice items about an image, drawn fresh each step (``--unique 0``) or cycled from a fixed
set (``--unique N``, like a pool), and prints, every ``--eval-every`` steps, one JSON line with
MMBench-en and -cn accuracy on the benchmark's own test items: single pass and circular (all four
rotations right), restricted to the option letters (teacher-forced, no generation).
This is the diagnostic behind the miniature benchmark's MMBench bar (issue #2).

    python experiments/image_choice.py --init src/icons/assets/tiny_llava_base --steps 1000

``--items pool``: the pool's multiple-choice family (colour, shape, count, position; four options
since generator v7, the pool's wording); ``--items colour``: "What color is the <shape> ?" about one
object, 4 options; ``--items number`` / ``position``: one MMBench skill alone (sign number or place),
4 options, pool images. Each row also gives, per MMBench skill, [single pass, circular].
``--train-vision`` trains the vision tower too.
Measured curves (which bases learn which skills, after how many items): docs/findings.md.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from icons.data.encode import Encoder, collate
from icons.data.mini_llava.families import LETTERS, MC_SUFFIX, make_record, mc_options, mc_prompt
from icons.data.mini_llava.language import ask
from icons.data.mini_llava.scenes import render, sample_scene, sample_sign
from icons.data.mini_llava.tasks import build_task
from icons.evaluate import rotations
from icons.models import tiny_llava


def _conv(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": answer}]


def _four_options(qa, rng: random.Random) -> dict:
    """A record asking ``qa`` among four lettered options in the pool's wording."""
    opts = mc_options(qa, rng, 4)
    return {"conversations": _conv(mc_prompt(qa.question, opts) + MC_SUFFIX, LETTERS[opts.index(qa.answer)])}


def train_item(rng: random.Random, items: str) -> tuple[dict, dict]:
    """(LLaVA record, image spec) of one training item."""
    if items == "colour":
        spec = sample_scene(rng, 1, 1)
        return _four_options(ask(spec, "color", rng), rng), spec
    if items in ("number", "position"):  # one MMBench skill alone, 4 options, pool images
        spec = sample_sign(rng, "train") if items == "number" else sample_scene(rng)
        qa = ask(spec, items, rng)
        while qa is None:
            spec = sample_scene(rng)
            qa = ask(spec, items, rng)
        return _four_options(qa, rng), spec
    rec = None
    while rec is None:
        rec = make_record("mc", rng)
    return {"conversations": rec["conversations"]}, rec["_spec"]


def skill_of(stem: str) -> str:
    """The MMBench analog's skill, read off the question stem."""
    for key, skill in (("number", "number"), ("How many", "count"), ("Where", "position"), ("shape", "shape"),
                       ("color", "color")):
        if key in stem:
            return skill
    return "other"


def test_items(task: str, n: int, seed: int) -> list[tuple[dict, dict, int]]:
    """Every rotation of ``n`` test items of an MMBench analog: (record, spec, answer index)."""
    out = []
    for rec in build_task(task, n, "test", seed, set()):
        for rot, letter in rotations(task, rec):
            out.append(({"conversations": rot["conversations"], "skill": skill_of(rec["stem"])}, rec["_spec"],
                        LETTERS.index(letter)))
    return out


class Scorer:
    def __init__(self, model, tok, enc: Encoder, image_size: int):
        self.model, self.tok, self.enc, self.image_size = model, tok, enc, image_size
        self.letters = [tok.convert_tokens_to_ids(x) for x in LETTERS]

    def batch(self, items: list[tuple[dict, dict]], with_answer: bool) -> dict:
        enc = [self.enc.encode(r, with_answer=with_answer, pixels=tiny_llava.pixels_uint8(render(s), self.image_size))
               for r, s in items]
        return collate(enc, self.tok.pad_token_id, left_pad=not with_answer)

    @torch.no_grad()
    def accuracy(self, items: list[tuple[dict, dict, int]], batch_size: int = 100) -> dict[str, float]:
        """Single-pass and circular accuracy (items are rotations in groups of four)."""
        self.model.eval()
        hits = []
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            b = self.batch([(r, spec) for r, spec, _ in chunk], with_answer=False)
            b.pop("labels")
            logits = self.model(**b).logits[:, -1, self.letters]
            hits += [int(lg.argmax()) == a for lg, (_, _, a) in zip(logits, chunk)]
        self.model.train()
        circular = [all(hits[i:i + 4]) for i in range(0, len(hits), 4)]
        out = {"single": round(100 * sum(hits) / len(hits), 1), "circular": round(100 * sum(circular) / len(circular), 1)}
        by_skill: dict[str, list[list[bool]]] = {}  # skill -> the four rotations' hits per item
        for i in range(0, len(hits), 4):
            by_skill.setdefault(items[i][0]["skill"], []).append(hits[i:i + 4])
        for k, groups in sorted(by_skill.items()):  # per skill: [single pass, circular]
            out[k] = [round(100 * sum(map(sum, groups)) / (4 * len(groups)), 1),
                      round(100 * sum(map(all, groups)) / len(groups), 1)]
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="a tiny LLaVA checkpoint (e.g. src/icons/assets/tiny_llava_base)")
    ap.add_argument("--items", choices=["pool", "colour", "number", "position"], default="pool")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower too (frozen by default)")
    ap.add_argument("--unique", type=int, default=0, help="cycle this many fixed items (0: fresh items every step)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=200, help="test items per task (each in 4 rotations)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # small gradients otherwise run 40-250x slower on CPU
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, tok = tiny_llava.load(a.init)
    vc = model.config.vision_config
    enc = Encoder(tok, tiny_llava.n_image_tokens(vc.image_size, vc.patch_size), vc.image_size, 256)
    scorer = Scorer(model, tok, enc, vc.image_size)
    tests = {t: test_items(t, a.eval_n, a.seed) for t in ("mmbench_en", "mmbench_cn")}
    for name, p in model.named_parameters():
        p.requires_grad = a.train_vision or not name.startswith("model.vision_tower")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    rng = random.Random(a.seed + 1)
    fixed = [train_item(rng, a.items) for _ in range(a.unique)]
    order: list[int] = []
    model.train()
    t0, losses = time.time(), []
    for step in range(1, a.steps + 1):
        if fixed:
            while len(order) < a.batch_size:  # epochs over the fixed set, each in a fresh order
                order += random.Random(a.seed * 1_000_003 + step).sample(range(len(fixed)), len(fixed))
            items = [fixed[order.pop()] for _ in range(a.batch_size)]
        else:
            items = [train_item(rng, a.items) for _ in range(a.batch_size)]
        loss = model(**scorer.batch(items, with_answer=True)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            row = {"step": step, "items_seen": step * a.batch_size, "loss": round(sum(losses) / len(losses), 4),
                   **{f"{t}_{k}": v for t, items_ in tests.items() for k, v in scorer.accuracy(items_).items()},
                   "wall_s": round(time.time() - t0, 1)}
            losses = []
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
