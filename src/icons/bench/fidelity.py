"""``python -m icons.bench.fidelity``: how much a projection changes ICONS's task scores.

On a sample of the mini benchmark pool (smoke-size generation: 600 pool records, 8 validation
items per task, sampled down to ``--pool``), with the shipped tiny base
(``src/icons/assets/tiny_llava_base``) after a short LoRA warmup (AdamW, as step 1), the
per-example LoRA gradients are computed once; then the task scores (mean cosine to each task's
validation gradients, max over sub-tasks; pool gradients Adam-preconditioned with the warmup's
moments unless ``--gradient sgd``) are computed exactly (``projection=none``) and through
``rademacher`` and ``kronecker`` at several dims and seeds. Against the exact scores, per
projection and dim (mean over tasks and seeds, and the worst task):
- top-20% overlap: |top 20% by projected score ∩ top 20% by exact score| / |top 20%|;
- Spearman rank correlation;
- selection overlap: the ICONS selection (vote, 20% budget) from projected vs exact scores.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch


def _data(n_pool: int, seed: int):
    from ..data.mini_llava.build import BenchmarkSpec
    from ..data.mini_llava.families import build_pool
    from ..data.mini_llava.tasks import TASK_NAMES, build_task

    spec = BenchmarkSpec(pool_size=600, n_val=8)  # conf/data/mini_llava_smoke + conf/tasks/mini_llava_smoke
    used: set[str] = set()
    val = [r for t in TASK_NAMES for r in build_task(t, spec.n_val, "val", spec.seed, used)]
    pool = build_pool(spec.pool_size, spec.seed, spec.p_duplicate, spec.p_label_noise, spec.p_garbage, used)
    pool = random.Random(seed).sample(pool, min(n_pool, len(pool)))
    return pool, val, list(TASK_NAMES)


def _encode(records, enc):
    from ..data.mini_llava.scenes import render
    from ..models.tiny_llava import pixels_uint8

    return [enc.encode(r, pixels=None if r["_spec"] is None else pixels_uint8(render(r["_spec"]), enc.image_size))
            for r in records]


def _grads(pe, items, pad, batch_size):
    from ..data.encode import collate
    from ..features.extract import batch_plan

    out = torch.zeros(len(items), pe.dim)
    for idx in batch_plan([len(e.input_ids) for e in items], batch_size):
        g, _ = pe(collate([items[i] for i in idx], pad))
        out[idx] = g
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _compare(exact: np.ndarray, approx: np.ndarray, top: float = 0.2) -> tuple[np.ndarray, np.ndarray, float]:
    """Per task: top-``top`` overlap and Spearman; and the overlap of the ICONS selections."""
    from ..consensus import select

    n = exact.shape[0]
    k = max(1, int(math.ceil(top * n)))
    overlap, rho = [], []
    for t in range(exact.shape[1]):
        a = set(np.argsort(-exact[:, t], kind="stable")[:k])
        b = set(np.argsort(-approx[:, t], kind="stable")[:k])
        overlap.append(len(a & b) / k)
        rho.append(np.corrcoef(_ranks(exact[:, t]), _ranks(approx[:, t]))[0, 1])
    s_exact, s_approx = set(select(exact, top)), set(select(approx, top))
    return np.array(overlap), np.array(rho), len(s_exact & s_approx) / max(1, len(s_exact))


def main(argv=None) -> None:
    from omegaconf import OmegaConf

    from ..config import conf_dir
    from ..data.encode import Encoder
    from ..features.grads import PerExampleGrads, per_example_loss
    from ..features.projection import make_projection
    from ..influence import adam_precondition, group_means, group_of, normalise_rows, task_table
    from ..models import tiny_llava
    from ..models.base import ASSET
    from ..models.lora import add_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=320, help="pool examples scored (of the 600 generated)")
    ap.add_argument("--dims", default="256,1024,4096")
    ap.add_argument("--kinds", default="rademacher,kronecker")
    ap.add_argument("--seeds", type=int, default=2, help="projection seeds per (kind, dim)")
    ap.add_argument("--warmup-steps", type=int, default=16)
    ap.add_argument("--gradient", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()

    model, tok = tiny_llava.load(ASSET)
    lora = OmegaConf.load(conf_dir() / "model" / "tiny_llava.yaml").lora  # the pipeline's LoRA (r 16, all linears)
    torch.manual_seed(a.seed)
    model = add_lora(model, lora)
    pool, val, tasks = _data(a.pool, a.seed)
    enc = Encoder(tok, tiny_llava.n_image_tokens(32, 8), 32, 160)
    pool_items, val_items = _encode(pool, enc), _encode(val, enc)
    pad = tok.pad_token_id

    # ---- warmup (ICONS step 1, shortened): AdamW on random pool examples, per-example-mean loss
    from ..data.encode import collate

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=4e-3, weight_decay=0.0)
    rng = random.Random(a.seed)
    model.train()
    for _ in range(a.warmup_steps):
        b = collate([pool_items[i] for i in rng.sample(range(len(pool_items)), min(8, len(pool_items)))], pad)
        labels = b.pop("labels")
        per_example_loss(model(**b).logits, labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    t_warm = time.perf_counter()

    # ---- per-example gradients, once
    with PerExampleGrads(model) as pe:
        layout = [(n, tuple(p.shape)) for n, p in pe.params]
        g_pool = _grads(pe, pool_items, pad, a.batch_size)
        g_val = _grads(pe, val_items, pad, a.batch_size)
        if a.gradient == "adam":
            by_id = {id(p): n for n, p in pe.params}
            state = {by_id[id(p)]: opt.state[p] for p in params}
            m = torch.cat([state[n]["exp_avg"].reshape(-1) for n in pe.names])
            v = torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in pe.names])
            beta1, beta2 = opt.param_groups[0]["betas"]
            g_pool = adam_precondition(g_pool, m, v, beta1, beta2, opt.param_groups[0]["eps"])
        grad_dim = pe.dim
    t_grads = time.perf_counter()

    labels = [group_of(r) for r in val]
    groups = sorted(set(labels))

    def task_scores(pool_feats: torch.Tensor, val_feats: torch.Tensor) -> np.ndarray:
        means = group_means(normalise_rows(val_feats), labels, groups)
        s = (normalise_rows(pool_feats) @ means.T).double().numpy()
        return task_table(s, groups, tasks)

    exact = task_scores(g_pool, g_val)
    print(f"pool={len(pool)} val={len(val)} ({len(groups)} groups, {len(tasks)} tasks) grad_dim={grad_dim} "
          f"gradient={a.gradient} threads={torch.get_num_threads()}; warmup {t_warm - t_start:.1f}s, "
          f"gradients {t_grads - t_warm:.1f}s")
    print(f"{'projection':<11} {'dim':>5} {'top20_overlap':>13} {'(worst task)':>12} {'spearman':>8} "
          f"{'(worst task)':>12} {'selection_overlap':>17} {'proj_s':>7}")
    both = torch.cat([g_pool, g_val])
    for kind in [k for k in a.kinds.split(",") if k]:
        for dim in [int(d) for d in a.dims.split(",") if d]:
            ov, rho, sel, secs = [], [], [], 0.0
            for seed in range(a.seeds):
                t = time.perf_counter()
                proj = make_projection(kind, grad_dim, dim, seed, layout=layout)
                y = proj(both)
                secs += time.perf_counter() - t
                o, r, s = _compare(exact, task_scores(y[:len(pool)], y[len(pool):]))
                ov.append(o)
                rho.append(r)
                sel.append(s)
            ov, rho = np.stack(ov), np.stack(rho)
            print(f"{kind:<11} {dim:>5} {ov.mean():>13.3f} {ov.mean(0).min():>12.3f} {rho.mean():>8.3f} "
                  f"{rho.mean(0).min():>12.3f} {np.mean(sel):>17.3f} {secs / a.seeds:>7.2f}")
    print(f"total {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
