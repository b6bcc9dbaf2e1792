"""The stage-1 base of the tiny LLaVA: pretrained from scratch, cached, reproducible.

Like Vicuna + LLaVA's stage-1 projector, the base brings language and visual knowledge (captions,
text-only context QA, trivia) but not the target tasks' formats. ``python -m icons.models.base``
regenerates the shipped checkpoint (``src/icons/assets/tiny_llava_base``); tests run it at smoke size.

The recipe has two parts. Phase 0 pretrains from random weights (``lm_examples`` text-only, then
``examples`` of the mixed stream, one schedule). Then each continuation phase runs under a fresh
schedule: ``two_hop`` (text only, ``lm_phase``: the LM learns to compose look-up and letter, which
needs about 12k steps) and ``stream`` (the mixed stream of a given version again, which gives the
images back). The shipped phases are ``config.shipped_phases()``, the default of
``model.pretrain.phases`` (``docs/findings.md`` records what each one added).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.encode import Encoder
from ..data.mini_llava import tokenizer_corpus
from ..data.mini_llava.pretraining import STREAM_VERSION, TEXT_MIXES, base_stream, two_hop_stream
from ..data.mini_llava.scenes import render
from ..config import ModelConfig, PhaseConfig
from ..io import read_json, write_json
from ..train import OptimConfig, StreamedBatches, fit, lr_factor
from . import tiny_llava

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny_llava_base"


def lm_phase(model, batches, lr: float, seed: int, device: str = "cpu", loss: str = "token_mean",
             on_step=None) -> list[float]:
    """A plain AdamW loop over text-only ``batches`` (warmup 2% + cosine, no clipping): the loop of
    ``experiments/lm_lookup.py``, which measured the two-hop curve. ``on_step(step, loss)`` may
    evaluate; returns the loss of each step."""
    from ..features.grads import per_example_loss

    torch.manual_seed(seed)
    steps = batches.steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0.02, "cosine"))
    model.zero_grad(set_to_none=True)  # stale gradients would join the first step
    losses = []
    for step, batch in enumerate(batches, 1):
        model.train()
        batch = {k: v.to(device) for k, v in batch.items()}
        if loss == "token_mean":
            value = model(**batch).loss
        else:
            labels = batch.pop("labels")
            value = per_example_loss(model(**batch).logits, labels).mean()
        value.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(value.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def phase_dicts(phases) -> list[dict]:
    """Phases as plain dicts (from PhaseConfig objects, DictConfigs or dicts), validated."""
    from omegaconf import DictConfig, OmegaConf

    out = []
    for p in phases or []:
        if isinstance(p, DictConfig):
            p = OmegaConf.to_container(p)
        out.append(asdict(p if isinstance(p, PhaseConfig) else PhaseConfig(**p)))
    return out


def phases_entry(phases) -> dict:
    """The recipe's "phases" key, absent when there are none: recipes (and cache hashes) of
    phase-free bases stay as they were. One rule for the recorded recipe and the config's."""
    return {"phases": phase_dicts(phases)} if phases else {}


def run_phase(model, enc: Encoder, phase: dict, batch_size: int, text_qa_fraction: float, loss: str,
              trainer_cfg=None) -> list[float]:
    """One continuation phase, in place; the same training as running it from a saved checkpoint."""
    steps = max(1, phase["examples"] // batch_size)
    if phase["kind"] == "two_hop":
        return lm_phase(model, StreamedBatches(two_hop_stream(phase["seed"]), enc, batch_size, steps, render),
                        phase["lr"], phase["seed"], loss=loss)
    batches = StreamedBatches(base_stream(phase["seed"], text_qa_fraction, phase["stream"]), enc, batch_size, steps, render)
    optim = OptimConfig(lr=phase["lr"], warmup_ratio=0.02, scheduler="cosine", weight_decay=0.01, loss=loss)
    return fit(model, batches, optim, trainer_cfg, label=f"stage-1 base, {phase['kind']} v{phase['stream']}").losses


#: the tiny model's recipe as the schema states it (``config.ModelConfig``: sizes, ``pretrain``)
_MODEL = ModelConfig()
_PRETRAIN = _MODEL.pretrain


def pretrain_base(out_dir: str | Path, examples: int = _PRETRAIN.examples, batch_size: int = _PRETRAIN.batch_size,
                  lr: float = _PRETRAIN.lr, seed: int = _PRETRAIN.seed,
                  text_qa_fraction: float = _PRETRAIN.text_qa_fraction, image_size: int = _MODEL.image_size,
                  patch_size: int = _MODEL.patch_size, vision_hidden: int = _MODEL.vision_hidden,
                  vision_layers: int = _MODEL.vision_layers, text_hidden: int = _MODEL.text_hidden,
                  text_layers: int = _MODEL.text_layers, text_heads: int = _MODEL.text_heads,
                  max_length: int = _MODEL.max_length, loss: str = _PRETRAIN.loss, stream: int = STREAM_VERSION,
                  lm_examples: int = 0, trainer_cfg=None, init: str | Path | None = None, phases=()) -> Path:
    """Pretrain the tiny base into ``out_dir``: phase 0 (``lm_examples`` text-only examples, then
    ``examples`` of the mixed stream, under one warmup + cosine schedule), then ``phases`` in order.
    Left out, ``lm_examples`` and ``phases`` are none (phase 0 alone); the shipped base's recipe
    (``config.ModelConfig().pretrain``) has both.
    ``init``: continue from that checkpoint (its architecture and tokenizer; the size arguments
    are then ignored) under a fresh schedule, instead of starting from random weights; with
    ``examples=lm_examples=0`` phase 0 is skipped and the recipe recorded is the init's recipe
    with ``phases`` appended (so a chain of continuations records the base it builds)."""
    phases = phase_dicts(phases)
    for version in [stream] + [p["stream"] for p in phases if p["kind"] == "stream"]:  # before hours of training
        if version not in TEXT_MIXES:
            raise ValueError(f"base recipe asks for stream version {version}; this code generates {sorted(TEXT_MIXES)}")
    torch.set_flush_denormal(True)
    t0 = time.time()
    if init is not None:
        model, tokenizer = tiny_llava.load(init)
        vc, tc = model.config.vision_config, model.config.text_config
        image_size, patch_size, vision_hidden, vision_layers = vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers
        text_hidden, text_layers, text_heads = tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads
    else:
        tokenizer = tiny_llava.build_tokenizer(tokenizer_corpus())
        model = tiny_llava.build_model(tokenizer, image_size, patch_size, vision_hidden, vision_layers,
                                       text_hidden, text_layers, text_heads, seed=seed)
    enc = Encoder(tokenizer, tiny_llava.n_image_tokens(image_size, patch_size), image_size, max_length)
    losses = []
    continue_only = init is not None and examples == 0 and lm_examples == 0
    if not continue_only:
        steps = max(1, (lm_examples + examples) // batch_size)
        batches = StreamedBatches(base_stream(seed, text_qa_fraction, stream, lm_examples), enc, batch_size, steps, render)
        losses += fit(model, batches, OptimConfig(lr=lr, warmup_ratio=0.02, scheduler="cosine", weight_decay=0.01,
                                                   loss=loss), trainer_cfg, label="stage-1 base").losses
    for phase in phases:
        losses += run_phase(model, enc, phase, batch_size, text_qa_fraction, loss, trainer_cfg)
    recipe = {"examples": examples, "batch_size": batch_size, "lr": lr, "seed": seed,
              "text_qa_fraction": text_qa_fraction, "image_size": image_size, "patch_size": patch_size,
              "vision_hidden": vision_hidden, "vision_layers": vision_layers, "text_hidden": text_hidden,
              "text_layers": text_layers, "text_heads": text_heads, "max_length": max_length, "loss": loss,
              "stream": stream, "lm_examples": lm_examples}
    if continue_only and (Path(init) / "icons_base.json").exists():
        recipe = dict(read_json(Path(init) / "icons_base.json")["recipe"])
        recipe["phases"] = recipe.get("phases", []) + phases
    else:
        if init:
            recipe["init"] = str(init)
        recipe.update(phases_entry(phases))
    out = Path(out_dir)
    tiny_llava.save(model, tokenizer, out, image_size, patch_size)
    k = max(1, len(losses) // 20)
    write_json(out / "icons_base.json", {
        "recipe": recipe,
        **({"continued_from": str(init)} if continue_only else {}),
        "loss_curve": [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(time.time() - t0, 1),
        "accelerator": getattr(trainer_cfg, "accelerator", "cpu"),
    })
    return out


def parse_phases(text: str) -> list[dict]:
    """--phases: "shipped", "none" or a JSON list of PhaseConfig fields."""
    if text == "shipped":
        return phase_dicts(_PRETRAIN.phases)
    if text == "none":
        return []
    try:
        return phase_dicts(json.loads(text))
    except (TypeError, ValueError) as e:  # bad JSON, an unknown field, a value out of range
        raise SystemExit(f"--phases: expected 'shipped', 'none' or a JSON list of phases "
                         f"(e.g. '[{{\"kind\": \"stream\", \"examples\": 192000, \"lr\": 0.001, \"seed\": 7, \"stream\": 7}}]'): {e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSET))
    ap.add_argument("--examples", type=int, default=_PRETRAIN.examples)
    ap.add_argument("--batch-size", type=int, default=_PRETRAIN.batch_size)
    ap.add_argument("--lr", type=float, default=_PRETRAIN.lr)
    ap.add_argument("--seed", type=int, default=_PRETRAIN.seed)
    ap.add_argument("--text-layers", type=int, default=_MODEL.text_layers)
    ap.add_argument("--text-hidden", type=int, default=_MODEL.text_hidden)
    ap.add_argument("--lm-examples", type=int, default=_PRETRAIN.lm_examples,
                    help="text-only examples before the mixed stream")
    ap.add_argument("--stream", type=int, default=STREAM_VERSION, choices=sorted(TEXT_MIXES))
    ap.add_argument("--phases", default="shipped",
                    help="continuation phases after phase 0: 'shipped' (ModelConfig().pretrain.phases), 'none' or JSON")
    ap.add_argument("--init", default=None, help="continue from this checkpoint instead of random weights "
                    "(with --examples 0 --lm-examples 0: run only --phases)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--accelerator", default="cpu", help="cpu, gpu, ... (the recipe, not the device, defines the base)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from types import SimpleNamespace

    trainer = SimpleNamespace(accelerator=a.accelerator, devices=1, num_nodes=1, strategy="auto", precision="32-true")
    out = pretrain_base(a.out, a.examples, a.batch_size, a.lr, a.seed, text_layers=a.text_layers,
                        text_hidden=a.text_hidden, stream=a.stream, lm_examples=a.lm_examples, trainer_cfg=trainer,
                        init=a.init, phases=parse_phases(a.phases))
    print(f"base written to {out}")


if __name__ == "__main__":
    main()
