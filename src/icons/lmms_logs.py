"""Scores from lmms-eval's per-sample logs with the validation items held out of the benchmark.

MME, MMBench and LLaVA-Bench (in-the-wild) have no labelled split besides the evaluated one, so
their validation sets are carved out of it (``python -m icons.data.benchmarks ... --holdout``,
whose ``<task>.meta.json`` lists the ``heldout`` ids). lmms-eval scores every item; this re-scores
its ``--log_samples`` files (``<output_path>/<model>/<date>_samples_<task>.jsonl``) twice, with
every item and without the held-out ones, by the same rule, so the difference is the hold-out's:

- ``mme``: per category (acc + acc+) x 100, acc+ over images (both questions right), summed over
  the perception categories (the number the paper reports) and over the cognition ones; a held-out
  image drops both its questions;
- ``mmbench_en_dev`` / ``mmbench_cn_dev``: circular accuracy, a question right when every rotation
  (``index % 1e6``) is; a rotation is right when the answer's first option letter is the target's
  (lmms-eval falls back to a GPT judge for free-form answers; this does not, so answer with letters);
- ``llava_in_the_wild``: 100 x the mean GPT score of the model over that of the reference, as
  lmms-eval computes it (the judge's scores are in the log).

    python -m icons.lmms_logs OUTPUT_PATH --val-dir playground/data/icons_val
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

#: lmms-eval task -> the icons task whose ``<task>.meta.json`` lists the held-out ids
HELD_OUT_TASKS = {"mme": "mme", "mmbench_en_dev": "mmbench_en", "mmbench_cn_dev": "mmbench_cn",
                  "llava_in_the_wild": "llavaw"}
MME_COGNITION = {"commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"}
ROTATION = 1_000_000  # MMBench's circular copies of question i are rows i + k * 1e6


def samples_file(output_path: Path, task: str) -> Path:
    """The newest ``*_samples_<task>.jsonl`` under ``output_path`` (lmms-eval writes one per run)."""
    found = sorted(Path(output_path).rglob(f"*_samples_{task}.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {task} samples under {output_path}: run lmms-eval with --log_samples")
    return found[-1]


def read_samples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _metric(sample: dict, *names: str) -> dict:
    for n in names:
        if isinstance(sample.get(n), dict):
            return sample[n]
    raise KeyError(f"sample {sample.get('doc_id')} has none of {names}")


def _stem(name: str) -> str:
    return Path(str(name)).stem


def mme_key(sample: dict) -> tuple[str, str]:
    """(category, image) of an MME sample: lmms-eval's ``question_id`` names the image file."""
    m = _metric(sample, "mme_perception_score", "mme_cognition_score", "mme_percetion_score")
    return m["category"], _stem(str(m["question_id"]).split("/")[-1])


def mme_scores(samples: list[dict], held_out: set[tuple[str, str]] = frozenset()) -> dict[str, float]:
    by_image: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in samples:
        key = mme_key(s)
        if key not in held_out:
            by_image[key].append(float(_metric(s, "mme_perception_score", "mme_cognition_score",
                                               "mme_percetion_score")["score"]))
    by_cat: dict[str, list[list[float]]] = defaultdict(list)
    for (cat, _), scores in by_image.items():
        by_cat[cat].append(scores)
    cats = {c: 100 * (sum(map(sum, v)) / sum(map(len, v)) + sum(all(x > 0 for x in i) for i in v) / len(v))
            for c, v in by_cat.items()}
    return {"perception": sum(v for c, v in cats.items() if c not in MME_COGNITION),
            "cognition": sum(v for c, v in cats.items() if c in MME_COGNITION)}


def _letter(text: str) -> str | None:
    m = re.match(r"\s*\(?([A-E])(?:[).:\s]|$)", str(text))
    return m.group(1) if m else None


def mmbench_score(samples: list[dict], held_out: set[int] = frozenset()) -> float:
    groups: dict[int, bool] = {}
    for s in samples:
        m = _metric(s, "gpt_eval_score", "submission")
        q = int(m["index"]) % ROTATION
        if q in held_out:
            continue
        groups[q] = groups.get(q, True) and _letter(m["prediction"]) == str(m["answer"]).strip()
    return 100 * sum(groups.values()) / len(groups) if groups else float("nan")


def llavaw_id(sample: dict) -> int:
    doc = sample.get("doc") or {}
    return int(doc["question_id"]) if "question_id" in doc else int(sample["doc_id"])


def llavaw_score(samples: list[dict], held_out: set[int] = frozenset()) -> float:
    ref, model = [], []
    for s in samples:
        scores = _metric(s, "gpt_eval_llava_all")["scores"]
        if llavaw_id(s) in held_out or -999 in scores:
            continue
        ref.append(float(scores[0]))
        model.append(float(scores[1]))
    return 100 * (sum(model) / len(model)) / (sum(ref) / len(ref)) if ref else float("nan")


def held_out_ids(val_dir: Path, task: str) -> list:
    meta = Path(val_dir) / f"{task}.meta.json"
    return json.loads(meta.read_text())["heldout"] if meta.is_file() else []


def rescore(output_path: Path, val_dir: Path) -> list[dict]:
    """One row per held-out task found: items, the score with every item, the score without the
    validation items (both by the rules above)."""
    rows = []
    for lmms, icons_task in HELD_OUT_TASKS.items():
        try:
            samples = read_samples(samples_file(output_path, lmms))
        except FileNotFoundError:
            continue
        ids = held_out_ids(val_dir, icons_task)
        if lmms == "mme":  # icons' MME ids are <category>/<image stem>/<question>
            held = {(str(i).split("/")[0], str(i).split("/")[1]) for i in ids}
            every, kept = mme_scores(samples), mme_scores(samples, held)
            rows.append({"task": "mme (perception)", "items": len(samples), "held_out": len(held),
                         "all": every["perception"], "without_held_out": kept["perception"]})
            rows.append({"task": "mme (cognition)", "items": len(samples), "held_out": len(held),
                         "all": every["cognition"], "without_held_out": kept["cognition"]})
        elif lmms.startswith("mmbench"):
            held = {int(i) % ROTATION for i in ids}
            rows.append({"task": lmms, "items": len(samples), "held_out": len(held), "all": mmbench_score(samples),
                         "without_held_out": mmbench_score(samples, held)})
        else:
            held = {int(i) for i in ids}
            rows.append({"task": lmms, "items": len(samples), "held_out": len(held), "all": llavaw_score(samples),
                         "without_held_out": llavaw_score(samples, held)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icons.lmms_logs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_path", type=Path, help="lmms-eval's --output_path (run with --log_samples)")
    ap.add_argument("--val-dir", type=Path, required=True, help="the converter's --out directory (tasks.dir)")
    a = ap.parse_args(argv)
    rows = rescore(a.output_path, a.val_dir)
    if not rows:
        print(f"error: no mme, mmbench or llava_in_the_wild samples under {a.output_path}", file=sys.stderr)
        return 1
    print("| task | items | held out | score, all items | score, held-out items excluded |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['items']} | {r['held_out']} | {r['all']:.1f} | {r['without_held_out']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
