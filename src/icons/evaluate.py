"""Evaluation: greedy generation on each task's test split, scored with the task's own metric.

Metrics (scores in percent):
- ``exact``: normalised exact match (whitespace and digit spacing normalised, case kept);
- ``option``: the first token of the answer must be the right option letter;
- ``circular``: MMBench circular evaluation: the item is asked once per rotation of its options
  and counts only if every rotation is answered right;
- ``mme``: per sub-task (acc + acc+)/2, where acc+ needs both questions of an image right; the task
  score is the mean over sub-tasks;
- ``f1``: token F1 against the reference (LLaVA-Bench analog; no GPT judge offline).
Chance levels are computed from the same test records (see ``chance``).
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

import lightning as L

from .data.encode import Encoder, collate
from .data.mini_llava.families import LETTERS
from .data.mini_llava.tasks import METRIC, mc_text
from .predict import Rows, loader, predictor


def normalise(text: str) -> str:
    text = re.sub(r"(\d)", r" \1 ", text.strip())
    return " ".join(text.replace("</s>", " ").split()).rstrip(" .")


def tokens(text: str) -> list[str]:
    return [t for t in re.findall(r"\w+", text.lower())]


def token_f1(pred: str, ref: str) -> float:
    p, r = tokens(pred), tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


class Generation(L.LightningModule):
    """``predict_step``: greedy answers of one left-padded batch, as (record index, text) pairs."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        super().__init__()
        self.model, self.tok, self.max_new_tokens = model, tokenizer, max_new_tokens

    def predict_step(self, batch: Rows, batch_idx: int = 0):
        inputs = {k: v.to(self.device) for k, v in batch.data.items()}
        gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        out = []
        for i, row in zip(batch.idx, gen[:, inputs["input_ids"].shape[1]:].tolist()):
            if self.tok.eos_token_id in row:
                row = row[: row.index(self.tok.eos_token_id)]
            out.append((i, self.tok.decode(row, skip_special_tokens=True)))
        return out


def generate(model, encoder: Encoder, records: list[dict], max_new_tokens: int, batch_size: int = 64,
             trainer_cfg=None, label: str = "generate") -> list[str]:
    """Greedy answers for ``records`` (their last gpt turn is the reference and is not shown), by a
    Lightning prediction loop over batches of similar length (less padding)."""
    items = [encoder.encode(r, with_answer=False) for r in records]
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    plan = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    pad = encoder.tok.pad_token_id

    def make(rows):
        batch = collate([items[i] for i in rows], pad, left_pad=True)
        batch.pop("labels")
        return Rows(rows, batch)

    model.eval()
    out: list[str] = [""] * len(items)
    preds = predictor(trainer_cfg, label, total=len(plan)).predict(Generation(model, encoder.tok, max_new_tokens),
                                                                   loader(plan, make))
    for batch in preds:
        for i, text in batch:
            out[i] = text
    return out


def _row(rec: dict, pred: str, ref: str, hit) -> dict:
    return {"id": rec.get("id"), "prompt": rec["conversations"][-2]["value"], "prediction": pred,
            "reference": ref, "hit": hit}


def _rows(records: list[dict], preds: list[str], hits: list) -> list[dict]:
    return [_row(r, p, r["answer"], h) for r, p, h in zip(records, preds, hits)]


def rotations(task: str, rec: dict) -> list[tuple[dict, str]]:
    """MMBench's circular evaluation: ``rec`` once per rotation of its options, with the right letter."""
    opts, ans = rec["options"], rec["answer_index"]
    out = []
    for r in range(len(opts)):
        rot = opts[r:] + opts[:r]
        prompt = mc_text(task, rec["stem"], rot, rec.get("context"))
        new = dict(rec, conversations=[{"from": "human", "value": "<image>\n" + prompt},
                                       {"from": "gpt", "value": LETTERS[rot.index(opts[ans])]}])
        out.append((new, LETTERS[rot.index(opts[ans])]))
    return out


def evaluate_task(model, encoder: Encoder, task: str, records: list[dict], max_new_tokens: int,
                  batch_size: int = 64, trainer_cfg=None) -> dict:
    """{'score': percent, 'n': items, plus metric details, and 'predictions': one row per
    generated answer (id, prompt variant, prediction, reference, hit)} for one task's test records."""
    metric = METRIC[task]
    if metric == "circular":
        expanded = [(i, r, a) for i, rec in enumerate(records) for r, a in rotations(task, rec)]
        preds = generate(model, encoder, [r for _, r, _ in expanded], max_new_tokens, batch_size, trainer_cfg, task)
        ok: dict[int, bool] = defaultdict(lambda: True)
        single = []
        for (i, _, a), p in zip(expanded, preds):
            hit = normalise(p).split()[:1] == [a]
            ok[i] &= hit
            single.append(hit)
        rows = [_row(r, p, a, hit) for (_, r, a), p, hit in zip(expanded, preds, single)]
        return {"score": 100 * sum(ok.values()) / len(records), "n": len(records),
                "single_pass": 100 * sum(single) / len(single), "predictions": rows}
    preds = generate(model, encoder, records, max_new_tokens, batch_size, trainer_cfg, task)
    if metric == "exact":
        hits = [normalise(p) == normalise(r["answer"]) for p, r in zip(preds, records)]
        return {"score": 100 * sum(hits) / len(hits), "n": len(hits), "predictions": _rows(records, preds, hits)}
    if metric == "option":
        hits = [normalise(p).split()[:1] == [r["answer"]] for p, r in zip(preds, records)]
        return {"score": 100 * sum(hits) / len(hits), "n": len(hits), "predictions": _rows(records, preds, hits)}
    if metric == "f1":
        f1 = [token_f1(p, r["answer"]) for p, r in zip(preds, records)]
        return {"score": 100 * sum(f1) / len(f1), "n": len(f1), "predictions": _rows(records, preds, f1)}
    if metric == "mme":
        by_sub: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for p, r in zip(preds, records):
            by_sub[r["subtask"]][r["pair"]].append(normalise(p).lower() == r["answer"])
        subs = {}
        for sub, pairs in by_sub.items():
            acc = sum(sum(v) for v in pairs.values()) / sum(len(v) for v in pairs.values())
            acc_plus = sum(all(v) for v in pairs.values()) / len(pairs)
            subs[sub] = 100 * (acc + acc_plus) / 2
        hits = [normalise(p).lower() == r["answer"] for p, r in zip(preds, records)]
        return {"score": sum(subs.values()) / len(subs), "n": len(records), "subtasks": subs,
                "predictions": _rows(records, preds, hits)}
    raise ValueError(f"unknown metric {metric!r}")


def chance(task: str, records: list[dict], seed: int = 0) -> float:
    """Expected score of a guesser that knows the answer format but not the image."""
    metric = METRIC[task]
    if metric == "exact":
        return 100 * sum(1 / len(r["candidates"]) for r in records) / len(records)
    if metric == "option":
        return 100 * sum(1 / len(r["options"]) for r in records) / len(records)
    if metric == "circular":  # a uniform guess must hit every rotation
        return 100 * sum((1 / len(r["options"])) ** len(r["options"]) for r in records) / len(records)
    if metric == "mme":
        return 100 * (0.5 + 0.25) / 2
    if metric == "f1":  # the reference answer of another random test item of the same task
        rng = random.Random(seed)
        refs = [r["answer"] for r in records]
        return 100 * sum(token_f1(refs[rng.randrange(len(refs))], ref) for ref in refs) / len(refs)
    raise ValueError(metric)


def relative(scores: dict[str, float], full: dict[str, float], chance_: dict[str, float] | None = None) -> float:
    """Paper's relative performance: mean over tasks of score / full x 100; with ``chance_`` the
    chance-corrected variant, mean of (s - chance) / (full - chance) x 100. Tasks where full data
    is not above the reference point (0, or chance) have no defined ratio and are left out;
    NaN when no task is left."""
    vals = []
    for t, s in scores.items():
        ref = 0.0 if chance_ is None else chance_[t]
        if full[t] - ref > 0:
            vals.append(100 * (s - ref) / (full[t] - ref))
    return sum(vals) / len(vals) if vals else float("nan")
