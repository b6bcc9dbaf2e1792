"""``python -m icons.bench.throughput``: gradient-feature throughput at LLaVA-1.5 scale.

Builds a LLaVA-1.5-7B-shaped model with random weights (Vicuna-7B's Llama: 32 layers, 4096 wide;
CLIP ViT-L/14-336; the 2-layer projector; nothing is downloaded: throughput does not depend on the
weights' values), adds the paper's LoRA (r 128, alpha 256 on every LLM linear layer), writes a few
hundred synthetic LLaVA-format records with real PNG files, and runs icons' real feature stage
(``features.extract.extract``: vicuna_v1 encoding, image preprocessing, batched per-example
gradients, per-matrix Adam preconditioning and projection, the memory-mapped store) on them.

Printed side by side, on the same model and the same length-bucketed batches:
- icons: examples/s and tokens/s of ``extract`` (validation means included), peak GPU memory;
- a plain batched LoRA training step (forward, backward, AdamW) per example;
- the reference's floor: batch size 1, autograd, flatten, Adam (its dense projection left out,
  so the true reference is slower still; see ``icons.bench.features`` for the full comparison
  on the tiny model);
and the projected GPU-hours of the feature stage for LLaVA-665K (665,298 records) on this device.
``--size tiny`` runs the same code on a small model (CPU, for tests). Ends with one line:
``examples_per_s=<x> tokens_per_s=<y> peak_gib=<z> cost_vs_train_step=<c> speedup_vs_bs1_floor=<s>``.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

LLAVA_665K = 665_298
SIZES = {
    # (llm hidden, intermediate, layers, heads), (vision hidden, intermediate, layers, heads, image, patch)
    "7b": ((4096, 11008, 32, 32), (1024, 4096, 24, 16, 336, 14)),
    "13b": ((5120, 13824, 40, 40), (1024, 4096, 24, 16, 336, 14)),
    "tiny": ((64, 128, 2, 4), (32, 64, 2, 4, 28, 14)),
}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_tokenizer(n_words: int = 2000):
    """A word-level tokenizer shaped like Vicuna's for the template (bos/eos/unk, ``<image>``):
    one token per synthetic word, so token counts are controlled exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..models.llava15 import add_image_token
    from ..models.template import VICUNA_SYSTEM as SYSTEM

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    corpus = [SYSTEM, "USER: ASSISTANT:", " ".join(f"w{i}" for i in range(n_words))]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    add_image_token(fast)
    return fast


def build_model(size: str, tokenizer, dtype: torch.dtype, device: torch.device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    (h, inter, layers, heads), (vh, vi, vl, vheads, image, patch) = SIZES[size]
    tc = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    vc = CLIPVisionConfig(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vheads,
                          image_size=image, patch_size=patch, projection_dim=768)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      image_seq_length=(image // patch) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the target dtype (7B in fp32 would be 28 GB)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def synthetic_records(n: int, image_dir: Path, seed: int = 0, n_images: int = 32,
                      image_wh: tuple[int, int] = (640, 480)) -> list[dict]:
    """LLaVA-665K-like records: ~94% with an image (COCO-sized PNGs), 1-4 turns, questions of
    8-40 words and answers of 1-120 words."""
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        arr = nrng.integers(0, 256, (image_wh[1], image_wh[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(image_dir / f"{k}.png")

    def words(lo, hi):
        return " ".join(f"w{rng.randrange(2000)}" for _ in range(rng.randint(lo, hi)))

    recs = []
    for i in range(n):
        has_image = rng.random() < 0.94
        conv = []
        for t in range(rng.randint(1, 4)):
            q = words(8, 40)
            conv += [{"from": "human", "value": ("<image>\n" + q) if has_image and t == 0 else q},
                     {"from": "gpt", "value": words(1, 120)}]
        rec = {"id": f"syn-{i}", "conversations": conv}
        if has_image:
            rec["image"] = f"{rng.randrange(n_images)}.png"
        recs.append(rec)
    return recs


def main(argv=None) -> None:
    from ..data.encode import collate
    from ..features.extract import _adam_blocks, batch_plan, extract
    from ..features.grads import lora_parameters, reference_grads
    from ..models.llava15 import Encoder, Preprocess, image_processor
    from ..models.lora import add_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7b", choices=sorted(SIZES))
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=12288, help="padded tokens per batch (0 = no budget)")
    ap.add_argument("--projection", default="kronecker", choices=["kronecker", "rademacher", "none"])
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--r", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=256)
    ap.add_argument("--train-batches", type=int, default=6, help="batches timed for the training step")
    ap.add_argument("--bs1-examples", type=int, default=12, help="examples timed one at a time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    cuda = dev.type == "cuda"
    torch.set_flush_denormal(True)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    tok = build_tokenizer()
    model = build_model(a.size, tok, dtype, dev)
    lora = SimpleNamespace(r=a.r, alpha=a.alpha, dropout=0.05, target_modules=LORA_TARGETS)
    model = add_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():  # as after the warmup: B != 0, so every LoRA matrix has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.eval()
    params = lora_parameters(model)
    n_lora = sum(p.numel() for _, p in params)
    sync()
    build_s = time.perf_counter() - t0
    vc = model.config.vision_config
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recs = synthetic_records(a.examples + a.val, tmp / "images")
        pool, val = recs[:a.examples], [dict(r, task=f"t{i % 4}") for i, r in enumerate(recs[a.examples:])]
        pre = Preprocess(image_processor(tmp, vc.image_size))
        enc = Encoder(tok, pre, (vc.image_size // vc.patch_size) ** 2, 2048, tmp / "images")
        # Adam moments as the warmup leaves them (random, positive second moments)
        g = torch.Generator().manual_seed(2)
        m = {n: (torch.randn(p.shape, generator=g) * 1e-4) for n, p in params}
        v = {n: (torch.rand(p.shape, generator=g) * 1e-8 + 1e-12) for n, p in params}
        moments = (m, v, {"betas": (0.9, 0.999), "eps": 1e-8})
        lengths = [enc.length(r) for r in pool]
        tokens = sum(min(n, enc.max_length) for n in lengths)
        all_tokens = tokens + sum(min(enc.length(r), enc.max_length) for r in val)
        max_tokens = a.max_tokens or None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        t = time.perf_counter()
        meta = extract(model, enc, pool, val, tmp / "features", moments, a.projection, a.dim, 0, a.batch_size,
                       dtype="float16", max_tokens=max_tokens)
        sync()
        icons_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else float("nan")
        scores = np.load(tmp / "features" / "pool_scores.npy")
        if not np.isfinite(scores).all():
            raise RuntimeError("non-finite scores: the throughput run is not a valid extraction")

        # the same length-bucketed batches for the training step
        plan = batch_plan(lengths, a.batch_size, max_tokens)
        chosen = plan[len(plan) // 2:len(plan) // 2 + a.train_batches]  # mid-length batches
        batches = [{k: x.to(dev) for k, x in collate([enc.encode(pool[i]) for i in idx], tok.pad_token_id).items()}
                   for idx in chosen]
        opt = torch.optim.AdamW([p for _, p in params], lr=1e-6)

        def train_step(b):
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        train_step(batches[0])  # warm-up (optimizer state, kernels)
        sync()
        t = time.perf_counter()
        for b in batches:
            train_step(b)
        sync()
        train_s = time.perf_counter() - t
        n_train = sum(len(idx) for idx in chosen)
        model.eval()

        # the per-example floor of the reference: one example per backward, flattened, Adam
        mv = {n: (m[n].to(dev), v[n].to(dev)) for n, _ in params}
        names = [n for n, _ in params]
        one = [{k: x.to(dev) for k, x in collate([enc.encode(pool[i])], tok.pad_token_id).items()}
               for i in chosen[0][:a.bs1_examples]]
        sizes = [p.numel() for _, p in params]
        sync()
        t = time.perf_counter()
        for b in one:
            flat = reference_grads(model, b)
            blocks = zip(names, (x.view(1, *p.shape) for x, (_, p) in zip(torch.split(flat, sizes, 1), params)))
            torch.cat([x.flatten(1) for _, x in _adam_blocks(blocks, mv, 0.9, 0.999, 1e-8)], 1)
        sync()
        bs1_s = time.perf_counter() - t
    per_ex = {"icons": icons_s / (a.examples + a.val), "train_step": train_s / n_train, "bs1_floor": bs1_s / len(one)}
    eps = (a.examples + a.val) / icons_s
    where = torch.cuda.get_device_name(dev) if cuda else f"cpu threads={torch.get_num_threads()}"
    print(f"model={a.size} dtype={str(dtype).split('.')[-1]} device={where} build_s={build_s:.1f}")
    print(f"lora r={a.r} alpha={a.alpha:g} params={n_lora / 1e6:.1f}M projection={a.projection} dim={a.dim} "
          f"batch={a.batch_size} max_tokens={max_tokens} oom_retries={meta['oom_retries']}")
    print(f"pool={a.examples} val={a.val} real tokens={tokens} (mean {tokens / a.examples:.0f}/example)")
    for k, s in per_ex.items():
        print(f"  {k:<11} {1000 * s:9.1f} ms/example")
    hours = LLAVA_665K * per_ex["icons"] / 3600
    print(f"projected feature stage for LLaVA-665K ({LLAVA_665K} records, one warmup checkpoint): "
          f"{hours:.1f} GPU-hours on this device")
    print(f"examples_per_s={eps:.2f} tokens_per_s={all_tokens / icons_s:.0f} "
          f"peak_gib={peak:.1f} cost_vs_train_step={per_ex['icons'] / per_ex['train_step']:.2f} "
          f"speedup_vs_bs1_floor={per_ex['bs1_floor'] / per_ex['icons']:.2f}")


if __name__ == "__main__":
    main()
