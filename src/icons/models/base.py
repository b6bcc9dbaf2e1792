"""The stage-1 base of the tiny LLaVA: pretrained from scratch, cached, reproducible.

Like Vicuna + LLaVA's stage-1 projector, the base brings language and visual knowledge (captions,
text-only context QA, trivia) but not the target tasks' formats. ``python -m icons.models.base``
regenerates the shipped checkpoint (``src/icons/assets/tiny_llava_base``); tests run it at smoke size.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..data.encode import Encoder
from ..data.mini_llava import tokenizer_corpus
from ..data.mini_llava.pretraining import STREAM_VERSION, TEXT_MIXES, base_stream
from ..data.mini_llava.scenes import render
from ..io import write_json
from ..train import OptimConfig, StreamedBatches, fit
from . import tiny_llava

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny_llava_base"


def pretrain_base(out_dir: str | Path, examples: int = 288_000, batch_size: int = 32, lr: float = 2e-3,
                  seed: int = 0, text_qa_fraction: float = 0.5, image_size: int = 32, patch_size: int = 8,
                  vision_hidden: int = 96, vision_layers: int = 2, text_hidden: int = 160,
                  text_layers: int = 4, text_heads: int = 4, max_length: int = 160, loss: str = "token_mean",
                  stream: int = STREAM_VERSION, lm_examples: int = 0, trainer_cfg=None,
                  init: str | Path | None = None) -> Path:
    """Pretrain the tiny base into ``out_dir``: ``lm_examples`` text-only examples (a language-model
    phase), then ``examples`` of the mixed stream, under one warmup + cosine schedule.
    ``init``: continue from that checkpoint (its architecture and tokenizer; the size arguments
    are then ignored) under a fresh schedule, instead of starting from random weights."""
    if stream not in TEXT_MIXES:
        raise ValueError(f"base recipe asks for stream version {stream}; this code generates {sorted(TEXT_MIXES)}")
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
    steps = max(1, (lm_examples + examples) // batch_size)
    batches = StreamedBatches(base_stream(seed, text_qa_fraction, stream, lm_examples), enc, batch_size, steps, render)
    module = fit(model, batches, OptimConfig(lr=lr, warmup_ratio=0.02, scheduler="cosine", weight_decay=0.01, loss=loss),
                 trainer_cfg, label="stage-1 base")
    out = Path(out_dir)
    tiny_llava.save(model, tokenizer, out, image_size, patch_size)
    k = max(1, len(module.losses) // 20)
    write_json(out / "icons_base.json", {
        "recipe": {"examples": examples, "batch_size": batch_size, "lr": lr, "seed": seed,
                   "text_qa_fraction": text_qa_fraction, "image_size": image_size, "patch_size": patch_size,
                   "vision_hidden": vision_hidden, "vision_layers": vision_layers, "text_hidden": text_hidden,
                   "text_layers": text_layers, "text_heads": text_heads, "max_length": max_length, "loss": loss,
                   "stream": stream, "lm_examples": lm_examples, **({"init": str(init)} if init else {})},
        "loss_curve": [sum(module.losses[i:i + k]) / len(module.losses[i:i + k]) for i in range(0, len(module.losses), k)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(time.time() - t0, 1),
        "accelerator": getattr(trainer_cfg, "accelerator", "cpu"),
    })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ASSET))
    ap.add_argument("--examples", type=int, default=288_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=160)
    ap.add_argument("--lm-examples", type=int, default=96_000, help="text-only examples before the mixed stream")
    ap.add_argument("--stream", type=int, default=STREAM_VERSION, choices=sorted(TEXT_MIXES))
    ap.add_argument("--init", default=None, help="continue from this checkpoint instead of random weights")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--accelerator", default="cpu", help="cpu, gpu, ... (the recipe, not the device, defines the base)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from types import SimpleNamespace

    trainer = SimpleNamespace(accelerator=a.accelerator, devices=1, num_nodes=1, strategy="auto", precision="32-true")
    out = pretrain_base(a.out, a.examples, a.batch_size, a.lr, a.seed, text_layers=a.text_layers,
                        text_hidden=a.text_hidden, stream=a.stream, lm_examples=a.lm_examples, trainer_cfg=trainer,
                        init=a.init)
    print(f"base written to {out}")


if __name__ == "__main__":
    main()
