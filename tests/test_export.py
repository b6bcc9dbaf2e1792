"""Evaluation hand-off (export.py): merged HF LLaVA checkpoints that lmms-eval's llava_hf loads with
LlavaForConditionalGeneration + AutoProcessor, on the tiny LLaVA and on a tiny LLaVA-1.5 assembly."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icons import export as ex
from icons.config import LMMS_EVAL_TASKS, ConfigError, validate
from icons.data.encode import Encoder, collate
from icons.io import read_json, write_json
from icons.models import llava15, tiny_llava
from icons.models.template import TEMPLATES, VICUNA_SYSTEM, adds_bos
from icons.models.lora import add_lora

from .test_llava15 import RECORD, parts  # noqa: F401 - the tiny LLaVA-1.5 parts fixture
from .tiny_lora import LORA, tiny_lora_model

QUESTION = "What color is the square?"
TINY_RECORD = {"id": "r1", "image": "img.png", "conversations": [
    {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _reload(out: Path):
    """What lmms-eval's llava_hf does: the model and AutoProcessor from the directory."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoProcessor.from_pretrained(out)


def _lmms_prompt(processor, question: str, answer: str | None = None) -> str:
    """llava_hf's prompt: '<image>\\n' + question as a string user message, the tokenizer's template."""
    msgs = [{"role": "user", "content": f"<image>\n{question}"}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)


def _randomise_lora_b(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


@pytest.fixture()
def tiny(tmp_path):
    """(tokenizer, LoRA model with non-zero B, image dir): a non-square image (the export resizes
    like the tiny pipeline does)."""
    tok, model = tiny_lora_model()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    return tok, model, tmp_path


# ---------------------------------------------------------------- the tiny LLaVA
def test_tiny_export_equals_unmerged_lora_through_the_processor(tiny):
    tok, model, root = tiny
    enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 160, root)
    full, prompt = enc.encode(TINY_RECORD), enc.encode(TINY_RECORD, with_answer=False)
    batch = collate([full], tok.pad_token_id)
    want = _logits(model, batch)
    with model.disable_adapter():
        assert (_logits(model, batch) - want).abs().max() > 1e-3  # the LoRA matters
    info = ex.export(model, tok, ex.image_processor_for("tiny", 32), root / "out", "tiny", key="k1", source="mem")
    assert (info["dtype"], info["template"], info["image_tokens"], info["key"]) == ("float32", "tiny", 16, "k1")

    merged, proc = _reload(root / "out")
    image = Image.open(root / "img.png")
    # the lmms-eval prompt tokenizes exactly as icons encodes the question: 16 image tokens, <s> first
    ids = proc(text=_lmms_prompt(proc, QUESTION), images=image, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == prompt.input_ids and ids.count(merged.config.image_token_id) == 16 and ids[0] == tok.bos_token_id
    # the whole conversation through the processor = the training batch; logits = the unmerged model's
    inputs = proc(text=_lmms_prompt(proc, QUESTION, "red"), images=image, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == full.input_ids
    assert torch.equal(inputs["pixel_values"], batch["pixel_values"])
    got = _logits(merged, {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # list contents (the processor's own chat format) give the same prompt, images first
    listed = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    assert proc.apply_chat_template(listed, tokenize=False, add_generation_prompt=True) == _lmms_prompt(proc, QUESTION)


def test_existing_export_is_reused_a_different_one_refused(tiny, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    tok, model, root = tiny
    model = ex.merged(model)
    out = root / "out"
    ex.export(model, tok, ex.image_processor_for("tiny", 32), out, "tiny", key="k1")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ex.export(model, tok, None, out, "tiny", key="k1")["key"] == "k1"  # nothing built or written
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ex.ExportExists) as err:
        ex.export(model, tok, ex.image_processor_for("tiny", 32), out, "tiny", key="k2")
    assert "\n" not in str(err.value) and str(out) in str(err.value) and "another export" in str(err.value)
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ex.ExportExists, match="not an export"):
        ex.export(model, tok, ex.image_processor_for("tiny", 32), root / "other", "tiny", key="k1")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # a failed write leaves neither the export nor its temporary directory
    monkeypatch.setattr(LlavaForConditionalGeneration, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ex.export(model, tok, ex.image_processor_for("tiny", 32), root / "failed", "tiny", key="k3")
    assert sorted(p.name for p in root.iterdir()) == ["img.png", "other", "out"]


def test_cli_merges_an_adapter_onto_its_base(tmp_path, capsys):
    from icons.data.mini_llava import tokenizer_corpus

    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    base = tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32)
    tiny_llava.save(base, tok, tmp_path / "base")
    lora = add_lora(base, LORA).eval()
    _randomise_lora_b(lora)
    lora.save_pretrained(tmp_path / "adapter")  # adapter_config.json + weights, no tokenizer
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    batch = collate([Encoder(tok, 16, 32, 160, tmp_path).encode(TINY_RECORD)], tok.pad_token_id)
    want = _logits(lora, batch)

    args = [str(tmp_path / "adapter"), str(tmp_path / "out"), "--base", str(tmp_path / "base"), "--num-processes", "8"]
    assert ex.main(args) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1]
    assert cmd.startswith("accelerate launch --num_processes=8 -m lmms_eval --model llava_hf")
    assert (tmp_path / "out" / "lmms_eval.sh").read_text().strip().endswith(cmd)
    assert read_json(tmp_path / "out" / ex.INFO)["template"] == "tiny"  # from the tokenizer
    merged, _ = _reload(tmp_path / "out")
    torch.testing.assert_close(_logits(merged, batch), want, rtol=1e-5, atol=1e-5)
    assert ex.main(args) == 0  # the same export: reused
    # another model into the same directory: one line on stderr, exit status 1
    capsys.readouterr()
    assert ex.main([str(tmp_path / "base"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already holds another export" in err and "\n" not in err


# ---------------------------------------------------------------- LLaVA-1.5 (vicuna_v1)
def _llava15_lora(parts, dtype: str):
    model, tok, pre = llava15.assemble(parts["llm"], parts["vision"], parts["proj"], dtype)
    torch.manual_seed(0)
    model = add_lora(model, LORA)
    _randomise_lora_b(model)
    return model.eval(), tok, pre


def test_vicuna_export_equals_unmerged_lora_with_llava_preprocessing(parts, tmp_path):  # noqa: F811
    model, tok, pre = _llava15_lora(parts, "float32")
    enc = llava15.Encoder(tok, pre, 4, 256, parts["root"])
    full = enc.encode(RECORD)
    batch = collate([full], tok.pad_token_id)
    want = _logits(model, batch)
    ip = ex.image_processor_for("vicuna_v1", 28, llava15.image_processor(parts["vision"]))
    info = ex.export(model, tok, ip, tmp_path / "out", "vicuna_v1", key="k")
    assert (info["dtype"], info["image_tokens"]) == ("float32", 4)

    merged, proc = _reload(tmp_path / "out")
    image = Image.open(parts["root"] / "img.png")  # 36x20: padded to a square with the mean colour
    q1, q2 = (t["value"].replace("<image>", "").strip() for t in RECORD["conversations"][0::2])
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{q1}"}], tokenize=False,
                                                add_generation_prompt=True)
    # LLaVA-1.5's vicuna_v1; <s> written by the template as this tokenizer does not add it (test below)
    assert prompt == f"<s>{VICUNA_SYSTEM} USER: <image>\n{q1} ASSISTANT:"
    ids = proc(text=prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
    first = {**RECORD, "conversations": RECORD["conversations"][:2]}
    assert ids == enc.encode(first, with_answer=False).input_ids and ids.count(merged.config.image_token_id) == 4
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            {"role": "user", "content": q2}, {"role": "assistant", "content": "no"}]
    inputs = proc(text=proc.apply_chat_template(msgs, tokenize=False), images=image, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == full.input_ids
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], rtol=0, atol=1e-6)
    got = _logits(merged, {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_template_leaves_bos_to_a_tokenizer_that_adds_it(parts):  # noqa: F811
    """Vicuna's tokenizer adds <s> itself: the template must not write a second one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parts["llm"])
    assert not adds_bos(tok)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert adds_bos(tok)
    tok.chat_template = TEMPLATES["vicuna_v1"].jinja(bos=not adds_bos(tok))
    text = tok.apply_chat_template([{"role": "user", "content": "What is red?"}], tokenize=False, add_generation_prompt=True)
    assert text == f"{VICUNA_SYSTEM} USER: What is red? ASSISTANT:"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_vicuna_export_keeps_bf16(parts, tmp_path):  # noqa: F811
    model, tok, _ = _llava15_lora(parts, "bfloat16")
    ip = ex.image_processor_for("vicuna_v1", 28, llava15.image_processor(parts["vision"]))
    ex.export(model, tok, ip, tmp_path / "out", "vicuna_v1", key="k")
    merged, _ = _reload(tmp_path / "out")
    assert merged.dtype == torch.bfloat16 and read_json(tmp_path / "out" / ex.INFO)["dtype"] == "bfloat16"
    assert "pretrained=" + str((tmp_path / "out").resolve()) + ",dtype=bfloat16" in ex.write_command(tmp_path / "out")


# ---------------------------------------------------------------- the command, the stage, the report
def test_lmms_eval_command_lists_the_ten_benchmarks(tmp_path):
    from icons.handoff import lmms_eval_command

    cmd = lmms_eval_command(tmp_path / "exp", tmp_path / "res", dtype="bfloat16", num_processes=4)
    argv = shlex.split(cmd)
    assert argv[:6] == ["accelerate", "launch", "--num_processes=4", "-m", "lmms_eval", "--model"]
    opt = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--") and not argv[i + 1].startswith("--")}
    assert "--log_samples" in argv
    assert opt["--model"] == "llava_hf" and opt["--batch_size"] == "1"
    assert opt["--model_args"] == f"pretrained={(tmp_path / 'exp').resolve()},dtype=bfloat16"
    assert opt["--output_path"] == str((tmp_path / "res").resolve())
    assert opt["--tasks"].split(",") == list(LMMS_EVAL_TASKS) == [
        "vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val_ocr", "pope", "mme", "mmbench_en_dev",
        "mmbench_cn_dev", "llava_in_the_wild"]
    assert opt["--include_path"] == str((tmp_path / "exp" / "lmms_tasks").resolve())  # textvqa_val_ocr's yaml
    with pytest.raises(ValueError, match="comma"):
        lmms_eval_command(tmp_path / "a,b", tmp_path / "res")


def test_stage_exports_trained_models_and_report_lists_them(tiny, compose_cfg):
    from icons.report import export_lines, exports, write_report
    from icons.pipeline import Run
    from icons.stages import stage_export

    tok, model, root = tiny
    tiny_llava.save(model.merge_and_unload(), tok, root / "train" / "model")  # what the train stage writes
    write_json(root / "stages.json", {"train/full": {"key": "t1", "path": str(root / "train"), "wall_s": 1.0}})
    cfg = compose_cfg(["selectors=[full]", f"run_dir={root}"])
    first = stage_export(Run(cfg, root, root))["full"]
    stages = read_json(root / "stages.json")
    out = Path(stages["export/full"]["path"])
    assert out.parent == root / "export" and (out / "lmms_eval.sh").is_file() and (out / "config.json").is_file()
    assert stage_export(Run(cfg, root, root))["full"]["wall_s"] == first["wall_s"]  # reused
    listed = exports(stages)
    assert listed["full"]["lmms_eval"] == read_json(out / ex.INFO)["lmms_eval"]
    assert f"pretrained={out.resolve()},dtype=float32" in listed["full"]["lmms_eval"]
    assert any(listed["full"]["lmms_eval"] in line for line in export_lines(listed))
    write_json(root / "eval" / "chance.json", {t: 0.0 for t in cfg.tasks.names})  # a run without evaluations
    report = write_report(Run(cfg, root, root))
    assert listed["full"]["lmms_eval"] in report.read_text()
    assert read_json(root / "report.json")["exports"] == listed
    with pytest.raises(FileNotFoundError, match="no trained model 'random'"):
        stage_export(Run(compose_cfg([f"run_dir={root}"]), root, root))


def test_export_config(compose_cfg):
    obj = validate(compose_cfg(["+experiment=llava_20pct"]))
    assert obj.stages[obj.stages.index("train") + 1] == "export" and obj.export.lmms_tasks == list(LMMS_EVAL_TASKS)
    assert "export" not in validate(compose_cfg()).stages
    with pytest.raises(ConfigError, match=r"export.selectors=\[random\] contains 'random', which is not in selectors"):
        validate(compose_cfg(["selectors=[full]", "export.selectors=[random]"]))
    with pytest.raises(ConfigError, match="export.num_processes=0 must be > 0"):
        validate(compose_cfg(["export.num_processes=0"]))


# ---------------------------------------------------------------- one prompt: the exported template = the encoder
CONVERSATIONS = {
    "image, one turn": {"id": "a", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "blue"}]},
    "image, two turns": {"id": "b", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "yes or no?"}, {"from": "gpt", "value": "no"}]},
    "text only, two turns": {"id": "c", "conversations": [
        {"from": "human", "value": "What is red?"}, {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "yes or no?"}, {"from": "gpt", "value": "yes"}]},
}


def _messages(record: dict) -> list[dict]:
    """The record as lmms-eval's llava_hf sends it: string contents, '<image>\\n' before the question."""
    return [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in record["conversations"]]


def _processor_ids(proc, record, image, generation: bool) -> list[int]:
    msgs = _messages(record)[:-1] if generation else _messages(record)
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    images = image if "image" in record else None
    return proc(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("template", ["tiny", "vicuna_v1"])
def test_exported_chat_template_tokenizes_as_the_training_encoder(template, name, tiny, parts):  # noqa: F811
    """Training, feature extraction and evaluation encode through one template definition
    (models/template.py); the exported processor's chat template renders the same text, so lmms-eval's
    prompts tokenize to exactly the ids icons trained on: whole conversations and generation prompts."""
    record = CONVERSATIONS[name]
    if template == "tiny":
        tok, model, root = tiny
        enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 160, root)
        ip = ex.image_processor_for("tiny", 32)
    else:
        model, tok, pre = _llava15_lora(parts, "float32")
        root = parts["root"]
        enc = llava15.Encoder(tok, pre, 4, 256, root)
        ip = ex.image_processor_for("vicuna_v1", 28, llava15.image_processor(parts["vision"]))
    ex.export(model, tok, ip, root / f"out-{template}", template, key="k")
    _, proc = _reload(root / f"out-{template}")
    image = Image.open(root / "img.png")
    assert _processor_ids(proc, record, image, generation=False) == enc.encode(record).input_ids
    assert _processor_ids(proc, record, image, generation=True) == enc.encode(record, with_answer=False).input_ids


# ---------------------------------------------------------------- the script: a checked environment, TextVQA's OCR
def _fake_env(tmp_path: Path, transformers_stub: bool = False) -> dict:
    """PATH with `python` (this interpreter) and an `accelerate` that records its argv; PYTHONPATH
    with a stand-in lmms_eval package holding lmms-eval's textvqa_val.yaml (its released shape)."""
    import os
    import sys

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_ / "python").chmod(0o755)
    (bin_ / "accelerate").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'argv.txt'}\n")
    (bin_ / "accelerate").chmod(0o755)
    pkg = tmp_path / "site" / "lmms_eval"
    (pkg / "tasks" / "textvqa").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks" / "textvqa" / "textvqa_val.yaml").write_text(
        "task: textvqa_val\ntest_split: validation\ninclude: _default_template_textvqa_yaml\n")
    (pkg / "tasks" / "textvqa" / "_default_template_textvqa_yaml").write_text(
        'dataset_path: lmms-lab/textvqa\noutput_type: generate_until\nlmms_eval_specific_kwargs:\n  default:\n'
        '    pre_prompt: ""\n    post_prompt: "\\nAnswer the question using a single word or phrase."\n    ocr: false\n')
    paths = [str(tmp_path / "site")]
    if transformers_stub:  # an environment whose transformers cannot read a transformers-5 export
        (tmp_path / "site" / "transformers").mkdir()
        (tmp_path / "site" / "transformers" / "__init__.py").write_text(
            "__version__ = '4.37.2'\nclass AutoProcessor:\n    @staticmethod\n    def from_pretrained(d):\n"
            "        raise ValueError('unknown tokenizer class TokenizersBackend')\n")
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": ":".join(paths)}


def _lmms_yaml(path: Path) -> dict:
    """lmms-eval's include rule (utils.load_yaml_config): included files first, the file's keys on top."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    inc = cfg.pop("include", None)
    if inc is None:
        return cfg
    inc = Path(inc) if Path(inc).is_file() else path.parent / inc
    return {**_lmms_yaml(inc), **cfg}


def test_script_checks_transformers_and_writes_textvqa_with_ocr_tokens(tiny, tmp_path):
    import subprocess

    tok, model, root = tiny
    ex.export(model, tok, ex.image_processor_for("tiny", 32), root / "out", "tiny", key="k")
    cmd = ex.write_command(root / "out", LMMS_EVAL_TASKS)
    run = subprocess.run(["sh", str(root / "out" / "lmms_eval.sh")], env=_fake_env(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "argv.txt").read_text().split() == shlex.split(cmd)[1:]  # accelerate got the command
    task = _lmms_yaml(root / "out" / "lmms_tasks" / "textvqa_val_ocr.yaml")
    assert task["task"] == "textvqa_val_ocr" and task["test_split"] == "validation"
    assert task["dataset_path"] == "lmms-lab/textvqa"  # lmms-eval's own task, underneath
    assert task["lmms_eval_specific_kwargs"]["default"] == {
        "pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase.", "ocr": True}
    (tmp_path / "old").mkdir()
    old = subprocess.run(["sh", str(root / "out" / "lmms_eval.sh")], env=_fake_env(tmp_path / "old", True),
                         capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and not (tmp_path / "old" / "argv.txt").exists()  # stopped before lmms-eval
    last = old.stderr.strip().splitlines()[-1]
    assert last.startswith("icons: transformers 4.37.2 in this environment cannot read the exported processor")
    assert f"install transformers>={read_json(root / 'out' / ex.INFO)['transformers']}" in last
