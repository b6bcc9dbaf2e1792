"""The benchmark and diagnostic commands run end to end at toy sizes and print their
machine-readable last lines (their numbers are measurements, not asserted here)."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icons.data.mini_llava.pretraining import TEXT_MIXES, base_example, base_stream, facts_example
from icons.distributed import compute_device

ROOT = Path(__file__).resolve().parents[1]


def _last_line(args: list[str], tmp_path) -> str:
    return _lines(args, tmp_path)[-1]


def _lines(args: list[str], tmp_path) -> list[str]:
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin",
                              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_bench_features_line(tmp_path):
    lines = _lines(["-m", "icons.bench.features", "--examples", "8", "--batch-size", "4", "--dim", "64",
                    "--repeats", "1", "--projection", "kronecker"], tmp_path)
    selectors = [ln.split()[1] for ln in lines if ln.startswith("selector ")]
    assert sorted(selectors) == sorted(["icons", "length", "perplexity", "el2n", "semdedup", "coincide", "rds",
                                        "d2_pruning"])
    assert all(re.search(r"cost_vs_icons=[\d.]+$", ln) for ln in lines if ln.startswith("selector "))
    line = lines[-1]
    assert re.fullmatch(r"speedup_vs_reference=[\d.]+ speedup_vs_reference_regen=[\d.]+ cost_vs_train_step=[\d.]+", line)


def test_bench_throughput_line(tmp_path):
    line = _last_line(["-m", "icons.bench.throughput", "--size", "tiny", "--device", "cpu", "--examples", "8",
                       "--val", "4", "--batch-size", "4", "--dim", "64", "--r", "8", "--alpha", "16",
                       "--train-batches", "1", "--bs1-examples", "1"], tmp_path)
    assert re.fullmatch(r"examples_per_s=[\d.]+ tokens_per_s=\d+ peak_gib=nan cost_vs_train_step=[\d.]+ "
                        r"speedup_vs_bs1_floor=[\d.]+", line)


def test_lm_lookup_curve(tmp_path):
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "lm_lookup.py"), "--steps", "4", "--eval-every", "2", "--eval-n", "20",
                "--batch-size", "4", "--layers", "1", "--hidden", "32", "--device", "cpu", "--out", str(out)], tmp_path)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["mean"] <= 100 and "context_color" in r for r in rows)


def test_lm_lookup_color_curve(tmp_path):
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "lm_lookup.py"), "--color-lookup", "caption", "--copy", "0.5",
                "--steps", "2", "--eval-every", "2", "--eval-n", "10", "--batch-size", "4", "--layers", "1",
                "--hidden", "32", "--device", "cpu", "--out", str(out)], tmp_path)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert set(k for k in row if k.startswith("context_")) == {"context_color_lookup"}


def test_image_choice_curve(tmp_path):
    """experiments/image_choice.py: fine-tunes a checkpoint on image multiple choice (a fixed set
    cycled) and reports MMBench-en/cn single-pass and circular accuracy as JSON lines."""
    from icons.data.mini_llava import tokenizer_corpus
    from icons.models import tiny_llava

    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    tiny_llava.save(tiny_llava.build_model(tok, text_hidden=32, text_layers=1, vision_hidden=32), tok, tmp_path / "init")
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "image_choice.py"), "--init", str(tmp_path / "init"), "--unique", "8",
                "--steps", "3", "--eval-every", "2", "--eval-n", "3", "--batch-size", "4", "--threads", "1",
                "--out", str(out)], tmp_path)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    for r in rows:
        for t in ("mmbench_en", "mmbench_cn"):
            assert 0 <= r[f"{t}_circular"] <= r[f"{t}_single"] <= 100
            assert round(r[f"{t}_circular"] * 3 / 100, 6) in (0, 1, 2, 3)  # whole items of 3


def test_image_choice_one_skill_with_per_skill_scores(tmp_path):
    """``--items number --train-vision``: trains on sign-number choices, vision tower included, and
    reports [single pass, circular] for each MMBench skill, every test stem recognised."""
    from icons.data.mini_llava import tokenizer_corpus
    from icons.models import tiny_llava

    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    tiny_llava.save(tiny_llava.build_model(tok, text_hidden=32, text_layers=1, vision_hidden=32), tok, tmp_path / "init")
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "image_choice.py"), "--init", str(tmp_path / "init"), "--items", "number",
                "--train-vision", "--steps", "2", "--eval-every", "2", "--eval-n", "24", "--batch-size", "4",
                "--threads", "1", "--out", str(out)], tmp_path)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    for t in ("mmbench_en", "mmbench_cn"):
        skills = {k.removeprefix(t + "_") for k, v in row.items() if k.startswith(t) and isinstance(v, list)}
        assert skills == {"color", "count", "number", "position", "shape"}, skills
        for skill in skills:
            single, circular = row[f"{t}_{skill}"]
            assert 0 <= circular <= single <= 100


def test_lm_lookup_letter_curve_from_a_checkpoint(tmp_path):
    from icons.data.mini_llava import tokenizer_corpus
    from icons.models import tiny_llava

    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    model = tiny_llava.build_model(tok, text_hidden=32, text_layers=1, vision_hidden=32)
    tiny_llava.save(model, tok, tmp_path / "init")
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "lm_lookup.py"), "--letter-lookup", "--init", str(tmp_path / "init"),
                "--steps", "2", "--eval-every", "2", "--eval-n", "10", "--batch-size", "4", "--device", "cpu",
                "--out", str(out)], tmp_path)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert set(k for k in row if k.startswith("context_")) == {"context_letter_lookup"}


def test_lm_phase_comes_first_and_leaves_the_mixed_stream_unchanged_without_it():
    first = [r for _, r in zip(range(40), base_stream(0, 0.5, 3, lm_examples=25))]
    assert all(r["_spec"] is None for r in first[:25])
    plain = [r for _, r in zip(range(30), base_stream(0, 0.5, 3))]
    rng = random.Random(0)
    assert plain == [base_example(rng, 0.5, 3) for _ in range(30)]  # lm_examples=0: stream v3 as shipped
    with pytest.raises(ValueError, match="stream version 99"):
        next(base_stream(0, 0.5, 99))


def test_facts_answer_is_in_the_facts():
    rng = random.Random(3)
    for _ in range(50):
        q, a = facts_example(rng)
        facts = q["value"].split(" Question : ")[0]
        assert q["value"].startswith("Facts : ") and a["value"] in facts.split()
    assert "facts" in TEXT_MIXES[4] and "facts" not in TEXT_MIXES[3]


def test_compute_device(monkeypatch):
    from types import SimpleNamespace

    assert compute_device(SimpleNamespace(accelerator="cpu")) == torch.device("cpu")
    assert compute_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device(SimpleNamespace(accelerator="auto")) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        compute_device(SimpleNamespace(accelerator="gpu"))
    with pytest.raises(ValueError, match="tpu"):
        compute_device(SimpleNamespace(accelerator="tpu"))


def test_stream_v6_captions_objects_in_random_order_and_v5_in_cell_order():
    """Stream v6 = v5 with each scene's objects captioned in random order (the image is the same:
    rendering ignores the order); v5, the shipped base's stream, keeps cell order."""
    from icons.data.mini_llava.language import caption
    from icons.data.mini_llava.scenes import CELLS, render

    def scenes(version):
        out = []
        for r in [r for _, r in zip(range(400), base_stream(0, 0.5, version))]:
            spec = r["_spec"]
            if spec is not None and spec["kind"] == "scene" and len(spec["objs"]) > 1:
                assert r["conversations"][1]["value"] == caption(spec)
                out.append(spec)
        return out

    in_cell_order = lambda spec: [o["cell"] for o in spec["objs"]] == sorted((o["cell"] for o in spec["objs"]), key=CELLS.index)
    assert all(in_cell_order(s) for s in scenes(5))
    v6 = scenes(6)
    assert len(v6) > 40 and sum(not in_cell_order(s) for s in v6) > len(v6) // 3
    s = v6[next(i for i, s in enumerate(v6) if not in_cell_order(s))]
    ordered = {**s, "objs": sorted(s["objs"], key=lambda o: CELLS.index(o["cell"]))}
    assert render(s).tobytes() == render(ordered).tobytes() and caption(s) != caption(ordered)


def test_stream_v7_carries_the_two_hop_choice_in_facts_and_caption_form():
    """v7 = v6's captions plus the composed choice in its simplest form ("Facts : ... Candidates :")
    beside the caption form, at the shares of TEXT_MIXES[7]; v6 has no facts-form choice."""
    def prompts(version):
        return [r["conversations"][0]["value"] for _, r in zip(range(2000), base_stream(1, 1.0, version))]

    v7 = prompts(7)
    facts_choice = sum(p.startswith("Facts : ") and " Candidates : " in p for p in v7)
    caption_choice = sum(p.startswith("Context : ") and " Candidates : " in p for p in v7)
    assert abs(facts_choice / 2000 - TEXT_MIXES[7]["two_hop"]) < 0.03
    assert abs(caption_choice / 2000 - TEXT_MIXES[7]["choice"]) < 0.03
    assert not any(p.startswith("Facts : ") and " Candidates : " in p for p in prompts(6))


def test_pretrain_base_continues_from_a_checkpoint(tmp_path):
    """--init: the architecture and tokenizer come from the checkpoint, the weights move on."""
    from icons.models import tiny_llava
    from icons.models.base import pretrain_base

    first = pretrain_base(tmp_path / "a", examples=64, batch_size=16, text_hidden=32, text_layers=1, vision_hidden=32)
    second = pretrain_base(tmp_path / "b", examples=64, batch_size=16, lr=1e-3, stream=6, init=first)
    recipe = json.loads((second / "icons_base.json").read_text())["recipe"]
    assert recipe["init"] == str(first) and recipe["stream"] == 6
    assert (recipe["text_hidden"], recipe["text_layers"], recipe["vision_hidden"]) == (32, 1, 32)
    (m1, t1), (m2, t2) = tiny_llava.load(first), tiny_llava.load(second)
    assert t1.get_vocab() == t2.get_vocab()
    w1, w2 = m1.state_dict(), m2.state_dict()
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_phased_base_equals_its_chain_of_continuations(tmp_path):
    """The shipped base's recipe was run as a chain (lm_lookup.py --two-hop --save, then
    ``python -m icons.models.base --init``); pretrain_base(phases=...) must give the same weights in
    one call, and a phases-only continuation must record the whole recipe."""
    import sys

    from icons.models import tiny_llava
    from icons.models.base import main as base_main
    from icons.models.base import pretrain_base

    sys.path.insert(0, str(ROOT / "experiments"))
    from lm_lookup import main as lm_lookup_main

    size = dict(batch_size=16, text_hidden=32, text_layers=1, vision_hidden=32)
    phases = [{"kind": "two_hop", "examples": 32, "lr": 1e-3, "seed": 0},
              {"kind": "stream", "examples": 32, "lr": 1e-3, "seed": 3, "stream": 7}]
    one_call = pretrain_base(tmp_path / "one", examples=32, lm_examples=16, phases=phases, **size)
    phase0 = pretrain_base(tmp_path / "phase0", examples=32, lm_examples=16, **size)
    lm_lookup_main(["--two-hop", "--init", str(phase0), "--steps", "2", "--batch-size", "16", "--lr", "1e-3",
                    "--eval-every", "100", "--eval-n", "2", "--device", "cpu", "--save", str(tmp_path / "hop")])
    chained = pretrain_base(tmp_path / "chained", examples=32, lm_examples=0, batch_size=16, lr=1e-3, seed=3,
                            stream=7, init=tmp_path / "hop")  # the old CLI form of a stream phase
    base_main(["--init", str(phase0), "--examples", "0", "--lm-examples", "0", "--batch-size", "16",
               "--phases", json.dumps(phases), "--out", str(tmp_path / "continued")])
    weights = [tiny_llava.load(d)[0].state_dict() for d in (one_call, chained, tmp_path / "continued")]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], v) for k, v in tiny_llava.load(phase0)[0].state_dict().items())
    recipe = lambda d: json.loads((Path(d) / "icons_base.json").read_text())["recipe"]  # noqa: E731
    assert recipe(tmp_path / "continued") == recipe(one_call)
    assert [p["kind"] for p in recipe(one_call)["phases"]] == ["two_hop", "stream"]
    assert "phases" not in recipe(phase0)  # phase-free recipes keep their old form (and cache hash)


def test_unknown_stream_version_of_a_phase_stops_before_training(tmp_path):
    from icons.models.base import pretrain_base

    with pytest.raises(ValueError, match="stream version 99"):
        pretrain_base(tmp_path / "b", examples=10**9, phases=[{"kind": "stream", "stream": 99}])
    assert not (tmp_path / "b").exists()


def test_lm_lookup_two_hop_curve_and_its_items(tmp_path):
    """--two-hop reports the composed task per number of candidates and each hop alone; each
    item's letter names the candidate that the facts answer (worked out here from the text)."""
    import random
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    from lm_lookup import two_hop_record

    for i in range(200):
        rec, m = two_hop_record(random.Random(i))
        prompt, letter = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        facts = prompt.split("Facts : ")[1].split(" Question : ")[0].split(" . ")
        pairs = [f.rstrip(" .").split() for f in facts]  # [colour, shape]
        question = prompt.split(" Question : ")[1].split(" Candidates : ")[0].split()
        if question[1] == "color":  # What color is the <shape> ?
            answer = next(c for c, s in pairs if s == question[4])
        else:  # What shape is the <colour> object ?
            answer = next(s for c, s in pairs if c == question[4])
        cands = dict(c.split(" = ") for c in prompt.split(" Candidates : ")[1].split(" . Give")[0].split(" ; "))
        assert len(cands) == m and cands[letter] == answer
    out = tmp_path / "curve.jsonl"
    _last_line([str(ROOT / "experiments" / "lm_lookup.py"), "--two-hop", "--steps", "2", "--eval-every", "2",
                "--eval-n", "30", "--batch-size", "4", "--layers", "1", "--hidden", "32", "--device", "cpu",
                "--out", str(out), "--save", str(tmp_path / "trained")], tmp_path)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert set(k for k in row if k.startswith("context_")) == {
        "context_facts", "context_letter", "context_two_hop_2", "context_two_hop_3", "context_two_hop_4"}
    from icons.models import tiny_llava

    model, _ = tiny_llava.load(tmp_path / "trained")  # --save: a checkpoint the pipeline can start from
    assert model.config.text_config.num_hidden_layers == 1 and model.config.text_config.hidden_size == 32
