"""Re-scoring lmms-eval's --log_samples files without icons' held-out validation items, on logs in
lmms-eval's shape (per-sample metric dicts: mme_perception_score {question_id, category, score},
gpt_eval_score {index, prediction, answer, ...}, gpt_eval_llava_all {scores: [reference, model]});
the expected numbers are worked out by hand below."""
from __future__ import annotations

import json

import pytest

from icons.lmms_logs import main, rescore


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def logs(tmp_path):
    out = tmp_path / "lmms" / "llava_hf"
    mme = []  # two images per category, two questions per image
    answers = {("artwork", "10002"): (1, 1), ("artwork", "10003"): (1, 0),
               ("code_reasoning", "0020"): (0, 0), ("code_reasoning", "0021"): (1, 1)}
    for k, ((cat, img), scores) in enumerate(answers.items()):
        key = "mme_cognition_score" if cat == "code_reasoning" else "mme_perception_score"
        for q, s in enumerate(scores):
            mme.append({"doc_id": 2 * k + q, key: {"question_id": f"{cat}/{img}.jpg", "category": cat, "score": s}})
    _write(out / "20261202_samples_mme.jsonl", mme)
    mmb = []  # question 0: all four rotations right; question 1: one wrong; question 2: all right
    for q, wrong in ((0, None), (1, 2), (2, None)):
        for r in range(4):
            mmb.append({"doc_id": len(mmb), "gpt_eval_score": {"index": q + r * 1_000_000, "answer": "B",
                                                               "prediction": "A" if r == wrong else "B. a dog"}})
    _write(out / "20261202_samples_mmbench_en_dev.jsonl", mmb)
    llavaw = [{"doc_id": i, "gpt_eval_llava_all": {"scores": s}} for i, s in
              enumerate([[8, 6], [10, 10], [6, 3], [7, -999]])]
    _write(out / "20261202_samples_llava_in_the_wild.jsonl", llavaw)
    val = tmp_path / "icons_val"
    val.mkdir()
    (val / "mme.meta.json").write_text(json.dumps({"heldout": ["artwork/10003/0", "artwork/10003/1"]}))
    (val / "mmbench_en.meta.json").write_text(json.dumps({"heldout": [1]}))
    (val / "llavaw.meta.json").write_text(json.dumps({"heldout": [1]}))
    return tmp_path / "lmms", val


def test_rescored_without_the_held_out_items(logs):
    rows = {r["task"]: r for r in rescore(*logs)}
    # MME artwork: all: acc 3/4, acc+ 1/2 -> 125; without image 10003: acc 1, acc+ 1 -> 200
    assert rows["mme (perception)"]["all"] == pytest.approx(125.0)
    assert rows["mme (perception)"]["without_held_out"] == pytest.approx(200.0)
    # code_reasoning: acc 2/4, acc+ 1/2 -> 100 both ways (nothing of it held out)
    assert rows["mme (cognition)"]["all"] == pytest.approx(100.0) == rows["mme (cognition)"]["without_held_out"]
    # MMBench circular: questions 0 and 2 right of 3 -> 66.7; without question 1 -> 100
    assert rows["mmbench_en_dev"]["all"] == pytest.approx(200 / 3)
    assert rows["mmbench_en_dev"]["without_held_out"] == pytest.approx(100.0)
    # LLaVA-W: model/reference means, the -999 judgement skipped: (6+10+3)/(8+10+6); without doc 1: 9/14
    assert rows["llava_in_the_wild"]["all"] == pytest.approx(100 * 19 / 24)
    assert rows["llava_in_the_wild"]["without_held_out"] == pytest.approx(100 * 9 / 14)


def test_cli_prints_the_table(logs, capsys):
    assert main([str(logs[0]), "--val-dir", str(logs[1])]) == 0
    table = capsys.readouterr().out
    assert "| mmbench_en_dev | 12 | 1 | 66.7 | 100.0 |" in table
