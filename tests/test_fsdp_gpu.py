"""FSDP (trainer=fsdp) on one GPU: the same steps as a plain one-device run, checkpoints gathered to
full tensors that load in one CPU process, resume from them, and the trained model put back
together after the fit. Lightning offers FSDP on GPUs only, so this is skipped without CUDA (one
GPU: torch runs FSDP unsharded there; the gathering and loading calls are the same as on many)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from icons.data.encode import Encoder
from icons.io import read_json
from icons.train import OptimConfig, batches_for, fit, set_trainable
from icons.warmup import load_checkpoint, run_warmup

from .conftest import compose_config
from .test_sharded import POOL
from .tiny_lora import LORA, tiny_lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a GPU")
GLOBAL, EPOCHS = 4, 2


def _cfg(strategy):
    return compose_config(["trainer=gpu", "trainer.precision=32-true", f"trainer.strategy={strategy}",
                           f"train.batch_size={GLOBAL}", f"warmup.batch_size={GLOBAL}"]).trainer


def _run(out, strategy, resume_from=None):
    tok, model = tiny_lora_model(LORA)
    enc = Encoder(tok, 16, 32, 160)
    if resume_from is not None:
        shutil.copytree(resume_from / "warmup" / "checkpoint-1", out / "warmup" / "checkpoint-1")
    run_warmup(model, enc, POOL, out / "warmup", EPOCHS, GLOBAL, 5e-3, 0, _cfg(strategy))
    if resume_from is not None:
        return
    tok, model = tiny_lora_model(LORA)
    set_trainable(model, "lora", projector=True)  # two optimizer groups, as +experiment=llava_20pct
    batches = batches_for([enc.encode(r) for r in POOL], GLOBAL, EPOCHS, 1, tok.pad_token_id, _cfg(strategy))
    fit(model, batches, OptimConfig(lr=5e-3, warmup_ratio=0.3, scheduler="linear", loss="token_mean", projector_lr=1e-3), _cfg(strategy))
    assert not any("fsdp" in n.lower() for n, _ in model.named_modules())  # a plain model again
    out_ = model.cpu()(input_ids=torch.tensor([[1, 5, 6]])).logits  # and it runs
    assert torch.isfinite(out_).all()
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(out / "fit.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _run(root / "plain", "auto")
    _run(root / "fsdp", "fsdp")
    _run(root / "fsdp-resumed", "fsdp", resume_from=root / "fsdp")
    return root


def _close(a, b, tol=1e-5):
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |diff| {worst:.3g}")
    assert worst <= tol


def test_fsdp_takes_the_same_steps_and_saves_full_tensors(runs):
    for epoch in (1, 2):
        plain, fsdp = runs / "plain" / "warmup" / f"checkpoint-{epoch}", runs / "fsdp" / "warmup" / f"checkpoint-{epoch}"
        for name in ("lora.safetensors", "adam.safetensors"):
            _close(load_file(str(plain / name)), load_file(str(fsdp / name)))
        assert read_json(plain / "checkpoint.json") == read_json(fsdp / "checkpoint.json")
    _close(load_file(str(runs / "plain" / "fit.safetensors")), load_file(str(runs / "fsdp" / "fit.safetensors")))


def test_fsdp_checkpoint_resumes_and_loads_in_one_cpu_process(runs):
    for name in ("lora.safetensors", "adam.safetensors"):
        _close(load_file(str(runs / "fsdp" / "warmup" / "checkpoint-2" / name)),
               load_file(str(runs / "fsdp-resumed" / "warmup" / "checkpoint-2" / name)))
    _, model = tiny_lora_model(LORA)
    m, v, _ = load_checkpoint(model, runs / "fsdp" / "warmup" / "checkpoint-2")
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert {n: t.shape for n, t in m.items()} == shapes == {n: t.shape for n, t in v.items()}
