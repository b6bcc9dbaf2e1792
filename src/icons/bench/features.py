"""``python -m icons.bench.features``: gradient-feature cost, side by side in one process.

(a) the reference way (LESS / released ICONS): batch size 1, autograd, flatten all LoRA
    gradients, Adam-precondition, dense Rademacher projection. Fair version (``reference``): the
    dense +-1 matrix is generated once per run, before timing (the released code keeps it on the
    GPU; over a real pool its generation is amortised to nothing); harsh version
    (``reference_regen``, this benchmark's earlier reference): generated again for every batch;
(b) icons' way: one batched forward/backward per batch, per-example gradients from hooks streamed
    one LoRA matrix at a time, Adam per matrix, the projection accumulated per matrix (the
    whole-model per-example gradient is never formed); ``--projection kronecker``: the structured
    projection instead of the dense one;
(c) a plain batched LoRA training step (forward, backward, AdamW) on the same batches;
(d) what the baseline selectors compute per example: the ``forward`` stage's pass (loss, EL2N,
    pooled hidden states and COINCIDE's attention outputs in one forward, no gradients: what
    perplexity, el2n, semdedup, d2_pruning (two passes: base and warmup), coincide and rds cost)
    and ``length``'s tokenization alone.
(b), (c) and (d) use the same length-bucketed batches (``extract.batch_plan``, as extraction does).
Medians over repeats; a line per selector (its ms per example and its cost against icons' feature
pass), then ``speedup_vs_reference=<x> speedup_vs_reference_regen=<x'> cost_vs_train_step=<y>``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _setup(n: int, seed: int = 0):
    from types import SimpleNamespace

    from ..data.encode import Encoder
    from ..data.mini_llava.families import FAMILY_SHARES, make_record
    from ..data.mini_llava.scenes import render
    from ..models import tiny_llava
    from ..models.base import ASSET
    from ..models.lora import add_lora

    if (ASSET / "config.json").exists():
        model, tok = tiny_llava.load(ASSET)
    else:
        from ..data.mini_llava import tokenizer_corpus

        tok = tiny_llava.build_tokenizer(tokenizer_corpus())
        model = tiny_llava.build_model(tok)
    torch.manual_seed(seed)
    lora = SimpleNamespace(r=16, alpha=32, dropout=0.0,
                           target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = add_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.eval()
    import random

    rng = random.Random(seed)
    fams, weights = list(FAMILY_SHARES), list(FAMILY_SHARES.values())
    enc = Encoder(tok, 16, 32, 160)
    items, records = [], []
    while len(items) < n:
        rec = make_record(rng.choices(fams, weights)[0], rng)
        if rec is None:
            continue
        px = None if rec["_spec"] is None else tiny_llava.pixels_uint8(render(rec["_spec"]), 32)
        items.append(enc.encode(rec, pixels=px))
        # tokenized without its image (never opened): what the length selector reads
        records.append({**rec, "image": "unused.png"} if px is not None else rec)
    return model, tok, items, records, enc


def main(argv=None) -> None:
    from ..data.encode import collate
    from ..features.extract import _adam_blocks, batch_plan
    from ..features.grads import PerExampleGrads, reference_grads
    from ..features.projection import make_projection
    from ..influence import adam_precondition, normalise_rows

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--projection", default="rademacher", choices=["rademacher", "kronecker"],
                    help="icons' projection (the reference always uses the dense one)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every variant runs there)")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    dev = torch.device(a.device)
    model, tok, items, records, enc = _setup(a.examples)
    model.to(dev)
    pad = tok.pad_token_id
    # length-bucketed batches (extract's batch_plan), for icons and the training step alike; the
    # reference runs one example at a time (no padding)
    plan = batch_plan([len(e.input_ids) for e in items], a.batch_size)
    batches = [{k: v.to(dev) for k, v in collate([items[i] for i in idx], pad).items()} for idx in plan]
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(e.input_ids) for e in items)
    with PerExampleGrads(model) as pe:
        dim_in = pe.dim
        layout = [(n, tuple(p.shape)) for n, p in pe.params]
    proj = make_projection(a.projection, dim_in, a.dim, 0, layout=layout)
    m = torch.zeros(dim_in, device=dev)
    v = torch.full((dim_in,), 1e-8, device=dev)
    sizes = [o * i for _, (o, i) in layout]
    mv = {n: (mm.view(shape), vv.view(shape)) for (n, shape), mm, vv in
          zip(layout, torch.split(m, sizes), torch.split(v, sizes))}

    def make_dense():
        # generated where it is used (on a GPU: a device generator, as a GPU reference would)
        gen = torch.Generator(device=dev).manual_seed(0)
        return torch.randint(0, 2, (dim_in, a.dim), generator=gen, dtype=torch.int8, device=dev).float() * 2 - 1

    dense_once = make_dense()

    def reference(dense=None):
        for b in batches:
            g = reference_grads(model, b)  # one example at a time, autograd, flattened
            d = make_dense() if dense is None else dense  # harsh: materialised for every batch
            normalise_rows(adam_precondition(g, m, v, 0.9, 0.999, 1e-8) @ d / a.dim ** 0.5)

    def ours():
        with PerExampleGrads(model) as pe2:
            for b in batches:
                blocks, _ = pe2.stream(b)
                normalise_rows(proj.project_blocks(g for _, g in _adam_blocks(blocks, mv, 0.9, 0.999, 1e-8)))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step():
        model.train()
        for b in batches:
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()

    from ..selectors.forward import AttentionOutputs, batch_values, coincide_layers

    layers = coincide_layers(model.config.get_text_config().num_hidden_layers, None)
    image_id = tok.convert_tokens_to_ids("<image>")

    def forward_pass():
        attn = AttentionOutputs(model, layers)
        with torch.inference_mode():
            for b in batches:
                batch_values(model, dict(b), attn, image_id)
        attn.remove()

    def tokenize():
        for r in records:
            enc.encode(r, load_image=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    ours()  # warm caches (the projection's int8 blocks, allocator, CUDA kernels)
    train_step()
    forward_pass()
    times = {"reference": [], "reference_regen": [], "icons": [], "train_step": [], "forward": [], "tokenize": []}
    for _ in range(a.repeats):
        for name, fn in (("reference", lambda: reference(dense_once)), ("reference_regen", reference),
                         ("icons", ours), ("train_step", train_step), ("forward", forward_pass),
                         ("tokenize", tokenize)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_ex = {k: 1000 * v / a.examples for k, v in med.items()}
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"examples={a.examples} batch={a.batch_size} grad_dim={dim_in} proj_dim={a.dim} projection={a.projection} "
          f"device={where} padding={1 - real / padded:.1%}")
    for k in times:
        print(f"  {k:<15} median {med[k]:.3f}s  ({per_ex[k]:.2f} ms/example)  runs={[round(x, 3) for x in times[k]]}")
    passes = {"icons": ("icons", 1), "length": ("tokenize", 1), "perplexity": ("forward", 1),
              "el2n": ("forward", 1), "semdedup": ("forward", 1), "coincide": ("forward", 1), "rds": ("forward", 1),
              "d2_pruning": ("forward", 2)}
    for name, (what, n) in passes.items():
        ms = n * per_ex[what]
        print(f"selector {name:<11} {ms:8.2f} ms/example  ({n} x {what})  cost_vs_icons={ms / per_ex['icons']:.3f}")
    print(f"speedup_vs_reference={med['reference'] / med['icons']:.2f} "
          f"speedup_vs_reference_regen={med['reference_regen'] / med['icons']:.2f} "
          f"cost_vs_train_step={med['icons'] / med['train_step']:.2f}")


if __name__ == "__main__":
    main()
