"""One converter per source format. Each reads the benchmark's own released files, refuses the
split the task is evaluated on, takes a fixed-seed sample and returns ``(records, meta)``.

Image paths in the records are ``<image_prefix>/<the benchmark's own relative path>``; the default
prefixes follow LLaVA's ``playground/data`` layout, so one image root serves the pool and the
validation sets. MMBench's images are embedded in its TSV and are written under ``out_dir``.
"""
from __future__ import annotations

import base64
import csv
import io
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

from ...io import read_json, read_jsonl
from .common import (LETTERS, MC_CN, MC_EN, SHORT, UNANSWERABLE, EvaluatedSplitError, SourceError, join,
                     majority, record, sample, suffixed)

Meta = dict


def _refuse(task: str, split: str, evaluated: tuple[str, ...], hint: str) -> None:
    if split in evaluated:
        raise EvaluatedSplitError(f"{task}: '{split}' is the split {task} is evaluated on; {hint}")


# ---------------------------------------------------------------- VQAv2
VQAV2_EVALUATED = ("test-dev2015", "test2015")


def vqav2(questions: Path, annotations: Path, n: int, seed: int, image_prefix: str | None = None) -> tuple[list, Meta]:
    """``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``
    (split train2014 or val2014; LLaVA-1.5 is evaluated on test-dev2015). Answer: the
    annotation's ``multiple_choice_answer``. Use val2014: VQAv2 train is part of LLaVA-665K."""
    q, a = read_json(questions), read_json(annotations)
    split = q.get("data_subtype")
    if not split or "questions" not in q:
        raise SourceError(f"{questions}: not a VQAv2 questions file (no data_subtype/questions)")
    _refuse("vqav2", split, VQAV2_EVALUATED, "use v2_OpenEnded_mscoco_val2014_questions.json")
    if a.get("data_subtype") != split:
        raise SourceError(f"{annotations}: annotations of {a.get('data_subtype')!r}, questions of {split!r}")
    ann = {x["question_id"]: x for x in a["annotations"]}
    items = [x for x in q["questions"] if x["question_id"] in ann]
    prefix = image_prefix if image_prefix is not None else f"coco/{split}"
    out = []
    for i in sample([x["question_id"] for x in items], n, seed):
        x = items[i]
        image = f"COCO_{split}_{int(x['image_id']):012d}.jpg"
        out.append(record("vqav2", x["question_id"], suffixed(x["question"], SHORT),
                          ann[x["question_id"]]["multiple_choice_answer"], join(prefix, image)))
    return out, {"split": split, "candidates": len(items)}


# ---------------------------------------------------------------- GQA
GQA_EVALUATED = ("testdev", "test", "challenge", "submission")
_GQA_NAME = re.compile(r"^(train|val|testdev|test|challenge|submission)_(balanced|all)_questions")


def gqa(questions: Path, n: int, seed: int, image_prefix: str | None = None, split: str | None = None
        ) -> tuple[list, Meta]:
    """``<split>_balanced_questions.json`` ({qid: {imageId, question, answer, ...}}); the split is
    read from the released file name (or ``split``). LLaVA-1.5 is evaluated on testdev; GQA
    train_balanced is part of LLaVA-665K, so use val_balanced."""
    m = _GQA_NAME.match(Path(questions).name)
    split = split or (m.group(1) if m else None)
    if split is None:
        raise SourceError(f"{questions}: cannot tell the GQA split from the file name; pass split=")
    _refuse("gqa", split, GQA_EVALUATED, "use val_balanced_questions.json")
    data = read_json(questions)
    if not isinstance(data, dict):
        raise SourceError(f"{questions}: not a GQA questions file (expected an object keyed by question id)")
    items = [(qid, x) for qid, x in data.items() if x.get("answer") is not None]
    prefix = image_prefix if image_prefix is not None else "gqa/images"
    out = []
    for i in sample([qid for qid, _ in items], n, seed):
        qid, x = items[i]
        out.append(record("gqa", qid, suffixed(x["question"], SHORT), x["answer"], join(prefix, f"{x['imageId']}.jpg")))
    return out, {"split": split, "candidates": len(items)}


# ---------------------------------------------------------------- VizWiz
VIZWIZ_EVALUATED = ("test",)


def vizwiz(annotations: Path, n: int, seed: int, image_prefix: str | None = None) -> tuple[list, Meta]:
    """``train.json`` / ``val.json`` of VizWiz-VQA (a list of {image, question, answers,
    answerable}); the split is read from the image names (``VizWiz_<split>_...``). LLaVA-1.5 is
    evaluated on test. Answer: ``unanswerable`` for unanswerable items, else the majority answer."""
    data = read_json(annotations)
    if not isinstance(data, list) or not data or "image" not in data[0]:
        raise SourceError(f"{annotations}: not a VizWiz annotation file (a list of records with 'image')")
    splits = {x["image"].split("_")[1] if x["image"].count("_") >= 2 else None for x in data}
    if len(splits) != 1 or None in splits:
        raise SourceError(f"{annotations}: cannot tell the split from the image names ({sorted(map(str, splits))})")
    split = splits.pop()
    _refuse("vizwiz", split, VIZWIZ_EVALUATED, "use train.json or val.json")
    items = [x for x in data if x.get("answers")]
    prefix = image_prefix if image_prefix is not None else f"vizwiz/{split}"
    out = []
    for i in sample([x["image"] for x in items], n, seed):
        x = items[i]
        answer = "unanswerable" if int(x.get("answerable", 1)) == 0 else majority(a["answer"] for a in x["answers"])
        out.append(record("vizwiz", Path(x["image"]).stem, suffixed(x["question"], UNANSWERABLE, SHORT), answer,
                          join(prefix, x["image"])))
    return out, {"split": split, "candidates": len(items)}


# ---------------------------------------------------------------- ScienceQA-IMG
SQA_EVALUATED = ("test", "minitest")


def sqa(problems: Path, pid_splits: Path, n: int, seed: int, image_prefix: str | None = None,
        split: str = "val") -> tuple[list, Meta]:
    """``problems.json`` + ``pid_splits.json`` of ScienceQA; items with an image only (SQA-IMG).
    LLaVA-1.5 is evaluated on test. Prompt as LLaVA-1.5's (``Context: hint`` when there is one,
    question, ``A. choice`` lines, the option-letter instruction); answer: the letter."""
    _refuse("sqa", split, SQA_EVALUATED, "use split=val (or train, minival)")
    probs, splits = read_json(problems), read_json(pid_splits)
    if split not in splits:
        raise SourceError(f"{pid_splits}: no split {split!r} (has {sorted(splits)})")
    items = [pid for pid in splits[split] if probs[pid].get("image")]
    prefix = image_prefix if image_prefix is not None else f"scienceqa/images/{split}"
    out = []
    for i in sample(items, n, seed):
        pid = items[i]
        p = probs[pid]
        context = (p.get("hint") or "").strip()
        lines = ([f"Context: {context}"] if context else []) + [p["question"].strip()]
        lines += [f"{LETTERS[k]}. {c}" for k, c in enumerate(p["choices"])]
        answer = LETTERS[int(p["answer"])]
        out.append(record("sqa", pid, suffixed("\n".join(lines), MC_EN), answer, join(prefix, f"{pid}/{p['image']}"),
                          options=list(p["choices"])))
    return out, {"split": split, "candidates": len(items)}


# ---------------------------------------------------------------- TextVQA
TEXTVQA_EVALUATED = ("val", "test")


def textvqa(data_file: Path, n: int, seed: int, image_prefix: str | None = None, ocr: Path | None = None
            ) -> tuple[list, Meta]:
    """``TextVQA_0.5.1_<split>.json`` ({dataset_type, data: [...]}); LLaVA-1.5 is evaluated on val,
    so only train is accepted. With the Rosetta OCR file of the same split (``ocr``), or OCR
    tokens in the records, the prompt has LLaVA-1.5's ``Reference OCR token: ...`` line.
    Answer: the majority of the ten answers."""
    d = read_json(data_file)
    split = d.get("dataset_type") if isinstance(d, dict) else None
    if split is None or "data" not in d:
        raise SourceError(f"{data_file}: not a TextVQA file (no dataset_type/data)")
    _refuse("textvqa", split, TEXTVQA_EVALUATED, "use TextVQA_0.5.1_train.json")
    tokens = {}
    if ocr is not None:
        o = read_json(ocr)
        if o.get("dataset_type", split) != split:
            raise SourceError(f"{ocr}: OCR of {o.get('dataset_type')!r}, questions of {split!r}")
        tokens = {x["image_id"]: x.get("ocr_tokens", []) for x in o["data"]}
    items = [x for x in d["data"] if x.get("answers")]
    prefix = image_prefix if image_prefix is not None else "textvqa/train_images"
    out = []
    for i in sample([x["question_id"] for x in items], n, seed):
        x = items[i]
        toks = x.get("ocr_tokens") or tokens.get(x["image_id"]) or []
        parts = [x["question"]] + ([f"Reference OCR token: {', '.join(toks)}"] if toks else [])
        out.append(record("textvqa", x["question_id"], suffixed("\n".join(parts), SHORT), majority(x["answers"]),
                          join(prefix, f"{x['image_id']}.jpg")))
    return out, {"split": split, "candidates": len(items), "ocr": bool(tokens) or any("ocr_tokens" in x for x in items)}


# ---------------------------------------------------------------- POPE
def pope(src: Path, n: int, seed: int, image_prefix: str | None = None) -> tuple[list, Meta]:
    """POPE questions: a POPE ``.json``/``.jsonl`` question file ({question_id, image, text, label}
    per line) or, to build them the POPE way, a COCO ``instances_<split>.json`` (one present and
    one absent object per sampled image: "Is there a <object> in the image?", POPE's random
    setting). POPE is evaluated on COCO val2014 images, which are refused either way."""
    try:
        data = read_json(src)
    except ValueError:  # POPE's own files are JSON lines
        data = None
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _pope_from_coco(data, Path(src), n, seed, image_prefix)
    rows = read_jsonl(src) if data is None else (data if isinstance(data, list) else [data])
    if not rows or not {"image", "text", "label"} <= set(rows[0]):
        raise SourceError(f"{src}: neither a POPE question file nor COCO instances")
    if any("val2014" in r["image"] for r in rows):
        raise EvaluatedSplitError("pope: the questions are on COCO val2014 images, the images POPE is evaluated "
                                  "on; build them from instances_train2014.json")
    prefix = image_prefix if image_prefix is not None else "coco/train2014"
    out = []
    for i in sample([r["question_id"] for r in rows], n, seed):
        r = rows[i]
        out.append(record("pope", r["question_id"], suffixed(r["text"], SHORT), r["label"].strip().lower(),
                          join(prefix, r["image"])))
    return out, {"split": "questions", "candidates": len(rows)}


def _pope_from_coco(coco: dict, src: Path, n: int, seed: int, image_prefix: str | None) -> tuple[list, Meta]:
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    if any("val2014" in f for f in files.values()) or "val2014" in src.name:
        raise EvaluatedSplitError("pope: COCO val2014 holds the images POPE is evaluated on; use "
                                  "instances_train2014.json")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    present: dict[int, set[int]] = defaultdict(set)
    for a in coco["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    images = sorted(i for i in present if i in files and len(present[i]) < len(names))
    rng = random.Random(seed)
    picked = sorted(rng.sample(images, min(max(1, n // 2), len(images))))
    split = next((s for s in ("train2014", "train2017", "val2017") if s in src.name), "coco")
    prefix = image_prefix if image_prefix is not None else f"coco/{split}"
    out = []
    for image_id in picked:
        yes = rng.choice(sorted(present[image_id]))
        no = rng.choice(sorted(set(names) - present[image_id]))
        for cat, label in ((yes, "yes"), (no, "no")):
            q = f"Is there a {names[cat]} in the image?"
            out.append(record("pope", f"{image_id}-{cat}", suffixed(q, SHORT), label, join(prefix, files[image_id])))
    return out[:n], {"split": split, "candidates": len(images), "built_from": "coco_instances"}


# ---------------------------------------------------------------- MME
_YES_NO = re.compile(r"\s*Please answer yes or no\.?\s*$")
_IMAGE_EXT = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _mme_root(root: Path) -> Path:
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if subdirs and not any(_mme_qa_dir(p) for p in subdirs) and len(subdirs) == 1:
        return _mme_root(subdirs[0])  # e.g. MME_Benchmark_release_version/MME_Benchmark
    return root


def _mme_qa_dir(sub: Path) -> Path | None:
    if (sub / "questions_answers_YN").is_dir():
        return sub / "questions_answers_YN"
    return sub if any(sub.glob("*.txt")) else None


def mme(root: Path, n: int, seed: int, image_prefix: str | None = None, holdout: bool = False
        ) -> tuple[list, Meta]:
    """``MME_Benchmark_release_version/``: one folder per sub-task with ``images/`` +
    ``questions_answers_YN/*.txt`` or the images and ``*.txt`` side by side; each ``.txt`` holds
    the image's two ``question<TAB>Yes|No`` lines. MME has no split besides the evaluated one, so
    this needs ``holdout=True``: the sampled images are then carved out of the benchmark (and
    listed for exclusion from evaluation). Sampled per sub-task in image pairs, ``n`` spread
    evenly; every record keeps its ``subtask`` (a task with sub-tasks scores by the maximum over
    them). Prompt as LLaVA-1.5's: "Please answer yes or no." replaced by the short-answer line."""
    if not holdout:
        raise EvaluatedSplitError("mme: MME has only the evaluated set; pass holdout to carve the validation "
                                  "set out of it (its items are then listed for exclusion from evaluation)")
    root = _mme_root(Path(root))
    subs = sorted(p for p in root.iterdir() if p.is_dir() and _mme_qa_dir(p) is not None)
    if not subs:
        raise SourceError(f"{root}: no MME sub-task folders (with questions_answers_YN/ or *.txt)")
    per = max(1, n // (2 * len(subs)))
    prefix = image_prefix if image_prefix is not None else "MME_Benchmark_release_version"
    out, counts = [], {}
    for sub in subs:
        qa = _mme_qa_dir(sub)
        img_dir = sub / "images" if (sub / "images").is_dir() else sub
        pairs = []
        for txt in sorted(qa.glob("*.txt")):
            image = next((img_dir / (txt.stem + e) for e in _IMAGE_EXT if (img_dir / (txt.stem + e)).is_file()), None)
            if image is None:
                raise SourceError(f"{txt}: no image {txt.stem}.* in {img_dir}")
            lines = [ln.rstrip("\n").split("\t") for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if any(len(parts) != 2 for parts in lines):
                raise SourceError(f"{txt}: expected 'question<TAB>answer' lines")
            pairs.append((txt.stem, image, lines))
        chosen = sample([s for s, _, _ in pairs], per, seed)
        counts[sub.name] = 0
        for i in chosen:
            stem, image, lines = pairs[i]
            rel = image.relative_to(root).as_posix()
            for k, (question, answer) in enumerate(lines):
                q = _YES_NO.sub("", question).strip()
                out.append(record("mme", f"{sub.name}/{stem}/{k}", suffixed(q, SHORT), answer.strip(),
                                  join(prefix, rel), subtask=sub.name))
                counts[sub.name] += 1
    return out, {"split": "holdout", "subtasks": counts, "heldout": [r["id"] for r in out]}


# ---------------------------------------------------------------- MMBench
def _none(v: str | None) -> bool:
    return v is None or v.strip() == "" or v.strip().lower() in ("nan", "none")


def mmbench(tsv: Path, n: int, seed: int, out_dir: Path, lang: str = "en", image_prefix: str | None = None,
            holdout: bool = False) -> tuple[list, Meta]:
    """MMBench ``.tsv`` (index, question, hint, A-D, answer, category, image as base64, ...). The
    dev split is the one LLaVA-1.5 evaluates and the test split has no answers, so this needs
    ``holdout=True`` (the sampled questions are listed for exclusion from evaluation). Images are
    decoded and written to ``out_dir/<task>_images/<index>.<ext>``; the records name them
    ``<image_prefix>/<index>.<ext>`` (default ``<task>_images``: relative to ``out_dir``, which the meta
    then says as ``"image_root": "."``). Prompt as LLaVA-1.5's
    ``model_vqa_mmbench``: hint, question, ``A. option`` lines, the letter instruction (Chinese
    for ``lang=cn``)."""
    from PIL import Image

    task = f"mmbench_{lang}"
    csv.field_size_limit(sys.maxsize)
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"index", "question", "image"} <= set(rows[0]):
        raise SourceError(f"{tsv}: not an MMBench TSV (needs index, question, image columns)")
    if "answer" not in rows[0] or all(_none(r.get("answer")) for r in rows):
        raise SourceError(f"{tsv}: no answers (the test split); use the dev split with holdout")
    if not holdout:
        raise EvaluatedSplitError(f"{task}: the dev split is the one {task} is evaluated on (test has no answers); "
                                  f"pass holdout to carve the validation set out of it")
    images = Path(out_dir) / f"{task}_images"
    images.mkdir(parents=True, exist_ok=True)
    prefix = image_prefix if image_prefix is not None else f"{task}_images"
    out = []
    for i in sample([int(r["index"]) for r in rows], n, seed):
        r = rows[i]
        options = [(c, r[c]) for c in "ABCDEFGHI" if c in r and not _none(r[c])]
        lines = ([r["hint"].strip()] if not _none(r.get("hint")) else []) + [r["question"].strip()]
        lines += [f"{c}. {o}" for c, o in options]
        raw = base64.b64decode(r["image"])
        with Image.open(io.BytesIO(raw)) as im:
            ext = {"JPEG": "jpg", "PNG": "png"}.get(im.format or "", (im.format or "png").lower())
        name = f"{r['index']}.{ext}"
        (images / name).write_bytes(raw)
        out.append(record(task, r["index"], suffixed("\n".join(lines), MC_CN if lang == "cn" else MC_EN),
                          r["answer"].strip(), join(prefix, name), options=[o for _, o in options],
                          category=r.get("category")))
    meta = {"split": "holdout", "candidates": len(rows), "heldout": [r["id"] for r in out]}
    if image_prefix is None:  # the default names are relative to out_dir: readers resolve them there
        meta["image_root"] = "."
    return out, meta


# ---------------------------------------------------------------- LLaVA-Bench
def coco_val2014_name(name: str) -> str:
    """LLaVA-Bench (COCO)'s ``qa90_questions.jsonl`` names its images by bare COCO number
    (``000000441147.jpg``); COCO val2014's files are ``COCO_val2014_000000441147.jpg``."""
    return f"COCO_val2014_{name}" if re.fullmatch(r"\d{12}\.jpg", name) else name


def _coco_image(name: str, prefix: str, image_root: Path | None) -> str:
    """The record's image path: with ``image_root`` (where the paths start), the candidate that
    exists there (val2014's name first, then the bare name, as COCO 2017 folders have it)."""
    candidates = [join(prefix, coco_val2014_name(name)), join(prefix, name)]
    if image_root is None:
        return candidates[0]
    for c in candidates:
        if (Path(image_root) / c).is_file():
            return c
    raise SourceError(f"llavaw: image {name!r} is neither {Path(image_root) / candidates[0]} nor "
                      f"{Path(image_root) / candidates[1]}; pass --image-prefix with the folder (relative to "
                      f"--image-root) that holds COCO val2014's images")


def llavaw(questions: Path, answers: Path, n: int, seed: int, image_prefix: str | None = None,
           split: str | None = None, holdout: bool = False, image_root: Path | None = None) -> tuple[list, Meta]:
    """LLaVA-Bench ``questions.jsonl`` ({question_id, image, text, category}) + its GPT-4 answers
    (``answers_gpt4.jsonl``: {question_id, text}). The in-the-wild set (60 questions) is the
    evaluated one: it needs ``holdout=True`` and gives at most half of its questions. LLaVA-Bench
    (COCO) (``qa90_questions.jsonl`` + ``qa90_gpt4_answer.jsonl``, same format and question
    categories on COCO val2014 images) is not evaluated and is accepted as is. No prompt suffix
    (LLaVA-1.5 asks these as they are)."""
    split = split or ("coco" if "qa90" in Path(questions).name else "in_the_wild")
    if split == "in_the_wild" and not holdout:
        raise EvaluatedSplitError("llavaw: LLaVA-Bench (in-the-wild) is the evaluated set; use LLaVA-Bench (COCO) "
                                  "(qa90_questions.jsonl) or pass holdout")
    qs, ans = read_jsonl(questions), {a["question_id"]: a["text"] for a in read_jsonl(answers)}
    items = [q for q in qs if q["question_id"] in ans]
    if not items:
        raise SourceError(f"{answers}: no answer matches a question of {questions}")
    cap = n if split != "in_the_wild" else min(n, len(items) // 2)
    prefix = image_prefix if image_prefix is not None else (
        "coco/val2014" if split == "coco" else "llava-bench-in-the-wild/images")
    out = []
    for i in sample([q["question_id"] for q in items], cap, seed):
        q = items[i]
        image = _coco_image(q["image"], prefix, image_root) if split == "coco" else join(prefix, q["image"])
        out.append(record("llavaw", q["question_id"], q["text"].strip(), ans[q["question_id"]].strip(), image,
                          category=q.get("category")))
    meta = {"split": split if split != "in_the_wild" else "holdout", "candidates": len(items)}
    if split == "in_the_wild":
        meta["heldout"] = [r["id"] for r in out]
    return out, meta
