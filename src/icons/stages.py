"""The pipeline's stages: plain functions over files.

Each stage reads what earlier stages wrote, writes its own files atomically and a
``manifest.json`` last (key, outputs, wall time). A stage whose manifest exists with the same key
is skipped, so rerunning a command resumes it.

Two directories: ``run_dir`` (this job: data/base pointers, selections, subset, report) and
``study_dir`` (content-addressed results that several jobs can share: warmup, features, scores,
trained models and their evaluations, each under ``<stage>/<name>-<key>``). A single run uses
its run directory for both; the jobs of a Hydra multirun share the sweep directory as their
study, so ``-m selection.ratio=0.1,0.2 consensus=vote,mean`` warms up, extracts features, trains
and evaluates the full-data model once.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import tracking
from .config import ConfigError, vicuna_template
from .data.encode import Encoder, LazyEncoded
from .data.mini_llava.pretraining import STREAM_VERSION
from .data.pool import LazyPool
from .io import config_hash, read_json, read_jsonl, save_npy, slow_point, write_json, write_jsonl
from .features.sharded import barrier, init_distributed, is_main_process
from .train import OptimConfig, batches_for, fit, set_trainable


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    study_dir: Path

    def shared(self, stage: str, name: str, key: str) -> Path:
        return self.study_dir / stage / f"{name}-{key}"


# ---------------------------------------------------------------- one run per run directory
LOCK_NAME = ".icons.lock"


class RunDirLocked(RuntimeError):
    """Another icons run holds the run directory. ``str(err)`` is one line."""


@contextmanager
def lock_run_dir(run_dir: Path):
    """Hold an exclusive ``fcntl.flock`` on ``<run_dir>/.icons.lock`` for the whole run.

    A second run pointed at the same directory stops at once with :class:`RunDirLocked`. The
    kernel drops the lock when its holder exits, however it exits, so a killed run leaves a lock
    file but never a stale lock (the file is kept; only the lock on it counts)."""
    import fcntl
    import os
    import socket

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another process (or another open of this file)
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise RunDirLocked(f"run directory {run_dir} is in use by another icons run ({holder}; lock {path}); "
                           f"wait for it to finish or choose another run_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------- manifests
def finished(stage_dir: Path, key: str) -> dict | None:
    p = stage_dir / "manifest.json"
    if p.exists():
        m = read_json(p)
        if m.get("key") == key:
            return m
    return None


def finish(stage_dir: Path, key: str, t0: float, **info) -> dict:
    m = {"key": key, "wall_s": round(time.time() - t0, 2), **info}
    if is_main_process():  # data-parallel stages: rank 0 writes
        write_json(stage_dir / "manifest.json", m)
    return m


def section(cfg: DictConfig, *keys: str) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}


def key_of(run: Run, stage: str) -> str:
    """The key of an earlier stage's result, read from this run's pointer file."""
    return read_json(run.run_dir / "stages.json")[stage]["key"]


def _record(run: Run, stage: str, manifest: dict, path: Path) -> dict:
    """Remember in the run directory which (possibly shared) result this run used."""
    p = run.run_dir / "stages.json"
    if not is_main_process():
        return manifest
    table = read_json(p) if p.exists() else {}
    table[stage] = {"key": manifest["key"], "path": str(path), "wall_s": manifest.get("wall_s", 0.0)}
    write_json(p, table)
    return manifest


def stage_path(run: Run, stage: str) -> Path:
    return Path(read_json(run.run_dir / "stages.json")[stage]["path"])


# ---------------------------------------------------------------- data
@dataclass
class DataPaths:
    pool: Path
    image_root: Path
    meta: Path | None
    val: dict[str, Path]
    test: dict[str, Path]


def mini_llava_benchmark(cfg: DictConfig):
    """The generated mini-LLaVA benchmark of this config (its pool and/or its target tasks),
    built once into the cache."""
    from .data.mini_llava import BenchmarkSpec, build

    spec = BenchmarkSpec(pool_size=cfg.data.pool_size, n_val=cfg.tasks.n_val, n_test=cfg.tasks.n_test,
                         seed=cfg.data.seed, p_duplicate=cfg.data.p_duplicate,
                         p_label_noise=cfg.data.p_label_noise, p_garbage=cfg.data.p_garbage,
                         tasks=tuple(cfg.tasks.names),
                         family_shares=(tuple(sorted(cfg.data.family_shares.items()))
                                        if cfg.data.get("family_shares") else None))
    return build(spec, Path(cfg.cache_dir))


def stage_data(run: Run) -> dict:
    """Index the pool and materialise the task files; record where they are (``check.prepare_data``).

    The pool is read lazily from its own file through a byte-offset index (:func:`load_pool`).
    ``data.kind=llava_json``: the user's file is validated record by record (``check.py``); with
    ``data.on_bad_record=skip`` the bad ones are left out (``data/positions.npy`` holds the good
    ones' positions) and listed in ``data/bad_records.jsonl`` (file, position, id, field, kind,
    message). ``tasks.kind=llava_benchmarks``: the validation files written by
    ``python -m icons.data.benchmarks`` are validated the same way."""
    from .check import data_key, prepare_data

    cfg = run.cfg
    out = run.run_dir / "data"
    key = config_hash({"config": config_hash(section(cfg, "data", "tasks")), **data_key(cfg)})
    if m := finished(out, key):
        return _record(run, "data", m, out)
    t0 = time.time()
    return _record(run, "data", finish(out, key, t0, **prepare_data(cfg, out)), out)


def data_paths(run: Run) -> DataPaths:
    m = read_json(run.run_dir / "data" / "manifest.json")
    return DataPaths(Path(m["pool"]), Path(m["image_root"]), Path(m["meta"]) if m.get("meta") else None,
                     {k: Path(v) for k, v in m["val"].items()}, {k: Path(v) for k, v in m["test"].items()})


def load_pool(run: Run) -> LazyPool:
    """The pool as a lazy sequence (records read by position from the source file, never all at
    once): ``len``, indexing, iteration, ``.ids`` and ``.positions_of(ids)``."""
    m = read_json(run.run_dir / "data" / "manifest.json")
    return LazyPool(m["pool"], m["index"], m.get("positions"), read_json(m["ids"]), m["signature"])


def load_val(run: Run) -> list[dict]:
    """Every task's validation records, each with its ``task`` (its group, with its ``subtask`` if
    it has one: ``influence.group_of``)."""
    recs = []
    for task, path in data_paths(run).val.items():
        for r in read_json(path):
            recs.append(dict(r, task=task))
    return recs


# ---------------------------------------------------------------- base model
def base_recipe(cfg: DictConfig) -> dict:
    from .models.base import phases_entry

    m = cfg.model
    return {"examples": m.pretrain.examples, "batch_size": m.pretrain.batch_size, "lr": m.pretrain.lr,
            "seed": m.pretrain.seed, "text_qa_fraction": m.pretrain.text_qa_fraction,
            "image_size": m.image_size, "patch_size": m.patch_size, "vision_hidden": m.vision_hidden,
            "vision_layers": m.vision_layers, "text_hidden": m.text_hidden, "text_layers": m.text_layers,
            "text_heads": m.text_heads, "max_length": m.max_length, "loss": m.pretrain.loss,
            "stream": STREAM_VERSION, "lm_examples": m.pretrain.lm_examples,
            **phases_entry(m.pretrain.get("phases"))}


def resolve_base(cfg: DictConfig) -> Path:
    """The base checkpoint: ``model.path`` if given; else the shipped tiny base when its recipe
    matches the config; else one pretrained into the cache (once per recipe). ``kind=llava_1_5``:
    the LLM directory, after checking the three parts exist (``load_base`` assembles them)."""
    from .models.base import ASSET, pretrain_base

    if cfg.model.kind == "llava_1_5":
        from .models.llava15 import check_parts

        return check_parts(cfg.model.llm_path, cfg.model.vision_path, cfg.model.projector_path)
    if cfg.model.path:
        return Path(cfg.model.path)
    recipe = base_recipe(cfg)
    multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    shipped = ASSET / "icons_base.json"
    if shipped.exists() and read_json(shipped)["recipe"] == recipe:
        return ASSET
    cached = Path(cfg.cache_dir) / "tiny_llava_base" / config_hash(recipe)
    if not (cached / "icons_base.json").exists():
        if multi:  # rank 0 runs this stage alone; the others wait for it
            raise RuntimeError(f"the tiny base for this model config is not pretrained yet: run "
                               f"`python -m icons.run stages=[data,base]` with one process first ({cached})")
        print(f"[icons] pretraining the tiny base into {cached} (once per recipe)", flush=True)
        tmp = cached.with_name(cached.name + ".partial")
        pretrain_base(tmp, **recipe, trainer_cfg=cfg.trainer)
        tmp.rename(cached)
    return cached


def stage_base(run: Run) -> dict:
    out = run.run_dir / "base"
    key = config_hash(section(run.cfg, "model"))
    if m := finished(out, key):
        return _record(run, "base", m, out)
    t0 = time.time()
    return _record(run, "base", finish(out, key, t0, path=str(resolve_base(run.cfg))), out)


def load_base(run: Run):
    from .models import tiny_llava

    path = read_json(run.run_dir / "base" / "manifest.json")["path"]
    if vicuna_template(run.cfg.model):  # LLaVA-1.5: assembled from its parts, or an HF checkpoint
        from .models import llava15

        return llava15.load_base(run.cfg.model)
    return tiny_llava.load(path)


def save_model(run: Run, model, tokenizer, path: Path) -> None:
    """A trained model as an HF checkpoint with the processor of its kind (LLaVA-1.5: the CLIP
    tower's image processor, so the directory loads like any llava-hf release)."""
    from .models import llava15, tiny_llava

    m = run.cfg.model
    if vicuna_template(m):
        llava15.save(model, tokenizer, llava15.model_preprocess(m), path)
    else:
        tiny_llava.save(model, tokenizer, path, m.image_size, m.patch_size)


def load_model(run: Run, path: Path):
    """(model, tokenizer) of a directory written by :func:`save_model`."""
    from .models import llava15, tiny_llava

    if vicuna_template(run.cfg.model):
        model, tok, _ = llava15.load(path, run.cfg.model.dtype)
        return model, tok
    return tiny_llava.load(path)


def make_encoder(run: Run, tokenizer) -> Encoder:
    from .models.tiny_llava import n_image_tokens

    m = run.cfg.model
    if vicuna_template(m):
        from .models import llava15

        return llava15.make_encoder(m, tokenizer, data_paths(run).image_root)
    return Encoder(tokenizer, n_image_tokens(m.image_size, m.patch_size), m.image_size, m.max_length,
                   data_paths(run).image_root)


# ---------------------------------------------------------------- ICONS step 1: warmup
def stage_warmup(run: Run) -> dict:
    from .models.lora import add_lora
    from .warmup import run_warmup, warmup_ids

    cfg = run.cfg
    key = config_hash({**section(cfg, "warmup", "seed"), "data": key_of(run, "data"), "base": key_of(run, "base"),
                       "lora": OmegaConf.to_container(cfg.model.lora, resolve=True)})
    out = run.shared("warmup", "warmup", key)
    if m := finished(out, key):
        return _record(run, "warmup", m, out)
    t0 = time.time()
    pool = load_pool(run)
    ids = warmup_ids(pool.ids, cfg.warmup.fraction, cfg.seed)
    records = [pool[k] for k in pool.positions_of(ids)]  # only the warmup's share is ever read
    model, tok = load_base(run)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are initialised at random
    model = add_lora(model, cfg.model.lora)
    with tracking.stage_run(cfg, "warmup", run.run_dir) as wrun:
        ckpts = run_warmup(model, make_encoder(run, tok), records, out, cfg.warmup.epochs,
                           cfg.warmup.batch_size, cfg.warmup.lr, cfg.seed, cfg.trainer)
        if is_main_process():
            write_json(out / "ids.json", ids)
        tracking.log_summary(wrun, {"warmup/examples": len(ids), "warmup/checkpoints": len(ckpts)})
        tracking.log_files(wrun, "warmup", "warmup", [out / "ids.json", *sorted(out.glob("checkpoint-*"))])
    m = finish(out, key, t0, examples=len(ids), checkpoints=ckpts)
    print(f"[icons] warmup: {len(ids)} examples, {len(ckpts)} checkpoints in {m['wall_s']:.0f}s", flush=True)
    return _record(run, "warmup", m, out)


def warmup_checkpoints(run: Run) -> list[Path]:
    wdir = stage_path(run, "warmup")
    ckpts = sorted(wdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts if run.cfg.warmup.checkpoints == "all" else ckpts[-1:]


# ---------------------------------------------------------------- ICONS step 2: features
def stage_features(run: Run) -> dict:
    from .features.sharded import compute_device, extract_distributed, init_distributed
    from .models.lora import add_lora
    from .warmup import load_checkpoint

    cfg = run.cfg
    key = config_hash({**section(cfg, "gradient", "projection", "warmup"), "warmup": key_of(run, "warmup"),
                       "tasks": section(cfg, "tasks")})
    out = run.shared("features", "features", key)
    if m := finished(out, key):
        return _record(run, "features", m, out)
    t0 = time.time()
    pool, val = load_pool(run), load_val(run)
    # data parallel when launched by torchrun / srun (RANK, WORLD_SIZE): each rank writes its rows
    # of the shared store (features/sharded.py); rank 0 logs and records the result
    rank, world = init_distributed()
    device = compute_device(cfg.trainer)
    metas = {}
    with tracking.stage_run(cfg, "features", run.run_dir) as frun:  # a run on rank 0 only
        for ckpt in warmup_checkpoints(run):
            model, tok = load_base(run)
            model = add_lora(model, cfg.model.lora)
            moments = load_checkpoint(model, ckpt)
            model.to(device).eval()
            meta = extract_distributed(model, make_encoder(run, tok), pool, val, out / ckpt.name,
                                       moments if cfg.gradient.kind == "adam" else None, cfg.projection.kind,
                                       cfg.projection.dim, cfg.projection.seed, cfg.gradient.batch_size,
                                       cfg.projection.dtype, rank=rank, world_size=world,
                                       max_tokens=cfg.gradient.max_tokens)
            meta = {k: v for k, v in meta.items() if k not in ("complete", "rank", "rows_done")}
            metas[ckpt.name] = dict(meta, avg_lr=moments[2]["avg_lr"])
            print(f"[icons] features at {ckpt.name}: {meta['n_pool']} pool + {meta['n_val']} val, "
                  f"grad dim {meta['grad_dim']}, {meta['projection']['kind']} -> {meta['projection']['dim']} "
                  f"in {meta['wall_s']:.0f}s", flush=True)
        tracking.log_summary(frun, {"features/grad_dim": next(iter(metas.values()))["grad_dim"]})
        tracking.log_files(frun, "features", "features", sorted(out.glob("*/meta.json")) + sorted(out.glob("*/groups.json")))
    if rank != 0:
        return {"key": key, "checkpoints": metas}
    return _record(run, "features", finish(out, key, t0, checkpoints=metas), out)


# ---------------------------------------------------------------- ICONS step 3: specialist scores
def stage_scores(run: Run) -> dict:
    from .features.extract import check_feature_dirs, load_group_scores
    from .influence import MERGE, combine_checkpoints, task_table

    cfg = run.cfg
    fdir = stage_path(run, "features")
    key = config_hash({"features": key_of(run, "features")})
    out = run.shared("scores", "scores", key)
    if m := finished(out, key):
        return _record(run, "scores", m, out)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    fman = read_json(fdir / "manifest.json")
    check_feature_dirs([fdir / name for name in fman["checkpoints"]])  # one projection for pool, val, checkpoints
    per_ckpt, lrs = [], []
    for name, meta in fman["checkpoints"].items():
        s, groups, ids = load_group_scores(fdir / name)
        per_ckpt.append(s)
        lrs.append(meta["avg_lr"])
    combined = combine_checkpoints(per_ckpt, lrs)
    tasks = list(cfg.tasks.names)
    table = task_table(combined, groups, tasks).astype(np.float32)
    save_npy(out / "task_scores.npy", table)
    save_npy(out / "merge_scores.npy", combined[:, groups.index(MERGE)].astype(np.float32))
    write_json(out / "ids.json", ids)
    write_json(out / "tasks.json", tasks)
    write_json(out / "weights.json", dict(zip(fman["checkpoints"], (np.asarray(lrs) / sum(lrs)).tolist())))
    with tracking.stage_run(cfg, "scores", run.run_dir) as srun:
        tracking.log_files(srun, "scores", "scores", [out / "task_scores.npy", out / "ids.json", out / "tasks.json"])
    return _record(run, "scores", finish(out, key, t0, n=len(ids), tasks=tasks), out)


def load_scores(run: Run) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    d = stage_path(run, "scores")
    return (np.load(d / "task_scores.npy"), np.load(d / "merge_scores.npy"), read_json(d / "ids.json"),
            read_json(d / "tasks.json"))


# ---------------------------------------------------------------- ICONS steps 4-5: generalist
def icons_name(cfg: DictConfig) -> str:
    """Report row of the influence selector: 'icons' (vote) or the consensus variant's name."""
    return "icons" if cfg.consensus.method == "vote" else cfg.consensus.method


def selector_names(cfg: DictConfig) -> list[str]:
    return [icons_name(cfg) if s == "icons" else s for s in cfg.selectors]


def selection_from_run(run: Run, src_run: Path, name: str, out: Path) -> dict:
    """Selection ``name`` of another finished run over the same pool (``selection.from_run``):
    the subset one model chose, to train another (the paper's 7B -> 13B transfer)."""
    src = src_run / "selection" / name
    if not (src / "manifest.json").exists():
        raise FileNotFoundError(f"selection.from_run={src_run}: no finished selection {name!r} ({src}/manifest.json)")
    source = read_json(src / "manifest.json")
    key = config_hash({"from_run": str(src_run.resolve()), "source_key": source["key"], "data": key_of(run, "data")})
    if m := finished(out, key):
        return m
    t0 = time.time()
    ids = read_json(src / "ids.json")
    pool_ids = load_pool(run).ids
    wanted = set(ids)
    pos = {i: k for k, i in enumerate(pool_ids) if i in wanted}
    missing = [i for i in ids if i not in pos]
    if missing or source.get("of") != len(pool_ids):
        raise ValueError(f"selection.from_run={src_run}: its {name!r} selection is over another pool "
                         f"({len(missing)} of its ids are not in this pool; pool sizes {source.get('of')} and "
                         f"{len(pool_ids)})")
    save_npy(out / "indices.npy", np.asarray([pos[i] for i in ids], dtype=np.int64))
    write_json(out / "ids.json", ids)
    return finish(out, key, t0, selector=name, n=len(ids), of=len(pool_ids), from_run=str(src_run.resolve()),
                  source_key=source["key"])


def stage_select(run: Run) -> dict:
    from . import consensus

    cfg = run.cfg
    results = {}
    for sel in cfg.selectors:
        if sel == "full":
            continue
        name = icons_name(cfg) if sel == "icons" else sel
        out = run.run_dir / "selection" / name
        out.mkdir(parents=True, exist_ok=True)
        if cfg.selection.get("from_run"):
            results[name] = selection_from_run(run, Path(cfg.selection.from_run), name, out)
            continue
        t0 = time.time()
        if sel == "random":
            ids = load_pool(run).ids
            key = config_hash({"data": key_of(run, "data"), "sel": section(cfg, "selection")})
            if m := finished(out, key):
                results[name] = m
                continue
            k = consensus.budget(len(ids), cfg.selection.ratio)
            idx = np.sort(np.asarray(random.Random(cfg.selection.seed).sample(range(len(ids)), k), dtype=np.int64))
            extra = {}
        elif sel == "icons":
            if "scores" not in read_json(run.run_dir / "stages.json"):
                raise FileNotFoundError(f"no task scores in {run.run_dir} for the icons selection: run the scores "
                                        f"stage, or set selection.from_run to reuse another run's selections")
            table, merge, ids, tasks = load_scores(run)
            key = config_hash({"scores": key_of(run, "scores"), "sel": section(cfg, "selection", "consensus")})
            if m := finished(out, key):
                results[name] = m
                continue
            c = cfg.consensus
            scores = merge[:, None] if c.method == "merge" else table
            idx = consensus.select(scores, cfg.selection.ratio, c.method, c.threshold_percentile, c.tie_break,
                                   cfg.selection.seed)
            v = consensus.votes(table, c.threshold_percentile)
            save_npy(out / "votes.npy", v.astype(np.int16))
            extra = {"vote_histogram": {int(k): int(n) for k, n in sorted(Counter(v.tolist()).items())},
                     "selected_vote_histogram": {int(k): int(n) for k, n in sorted(Counter(v[idx].tolist()).items())}}
        else:
            raise ValueError(f"unknown selector {sel!r}; available: full, random, icons")
        save_npy(out / "indices.npy", idx)
        slow_point("select")  # crash-test hook (off unless ICONS_TEST_SLOW_STAGE=select)
        write_json(out / "ids.json", [ids[i] for i in idx])
        results[name] = finish(out, key, t0, selector=name, n=int(len(idx)), of=len(ids), **extra)
        with tracking.stage_run(cfg, f"select-{name}", run.run_dir) as srun:
            tracking.log_summary(srun, {"select/n": int(len(idx)), **{f"select/votes_{k}": n for k, n in
                                                                       extra.get("selected_vote_histogram", {}).items()}})
            tracking.log_files(srun, f"selection-{name}", "selection", sorted(out.glob("*.npy")) + [out / "ids.json"])
    return results


# ---------------------------------------------------------------- step 5b: the subset files
def stage_subset(run: Run) -> dict:
    from .subset import write_subset

    results = {}
    pool = load_pool(run)
    paths = data_paths(run)
    meta = read_jsonl(paths.meta) if paths.meta and paths.meta.exists() else None
    for name in selector_names(run.cfg):
        if name == "full":
            continue
        out = run.run_dir / "selection" / name
        sel_key = read_json(out / "manifest.json")["key"]
        sub = out / "subset"
        if m := finished(sub, sel_key):
            results[name] = m
            continue
        t0 = time.time()
        stats = write_subset(pool, np.load(out / "indices.npy"), read_json(out / "ids.json"), meta, sub)
        results[name] = finish(sub, sel_key, t0, **stats)
        with tracking.stage_run(run.cfg, f"subset-{name}", run.run_dir) as srun:
            tracking.log_files(srun, f"subset-{name}", "subset", sorted(sub.glob("*.json")))
    return results


# ---------------------------------------------------------------- step 6: train on a selection
def selection_ids(run: Run, name: str, pool: LazyPool) -> list:
    if name == "full":
        return pool.ids
    path = run.run_dir / "selection" / name / "ids.json"
    if not path.exists():
        raise FileNotFoundError(f"no selection {name!r}: {path} (run the select stage first)")
    return read_json(path)


def train_model(run: Run, records: list[dict], out: Path, logger_run=None) -> dict:

    cfg = run.cfg
    model, tok = load_base(run)
    enc = make_encoder(run, tok)
    torch.manual_seed(cfg.seed)
    if cfg.train.mode == "lora":
        from .models.lora import add_lora

        model = add_lora(model, cfg.model.lora)
        set_trainable(model, "lora", projector=cfg.train.projector_lr is not None)
    else:
        set_trainable(model, "full")
    items = LazyEncoded(records, enc)
    batches = batches_for(items, cfg.train.batch_size, cfg.train.epochs, cfg.seed, tok.pad_token_id, cfg.trainer)
    optim = OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, warmup_ratio=cfg.train.warmup_ratio,
                        scheduler=cfg.train.scheduler, grad_clip=cfg.train.grad_clip, loss=cfg.train.loss,
                        projector_lr=cfg.train.projector_lr)
    torch.manual_seed(cfg.seed)
    module = fit(model, batches, optim, cfg.trainer, label=f"train {out.name}")
    if is_main_process():  # data parallel: rank 0 holds the whole trained model (also under FSDP)
        if cfg.train.mode == "lora":
            model = model.merge_and_unload()
        save_model(run, model, tok, out / "model")
    barrier()
    losses = module.losses
    k = max(1, len(losses) // 50)
    curve = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]
    for i, v in enumerate(curve):
        tracking.log_metrics(logger_run, {"train/loss": v, "train/step": i * k})
    return {"examples": len(records), "steps": len(losses), "loss_first": curve[0], "loss_last": curve[-1],
            "truncated": items.truncated}


def stage_train(run: Run) -> dict:
    cfg = run.cfg
    pool = load_pool(run)
    results = {}
    for name in selector_names(cfg):
        ids = selection_ids(run, name, pool)
        # the data key too: the ids (e.g. pool-000000...) stay the same when the pool's content changes
        key = config_hash({**section(cfg, "train", "seed"), "base": key_of(run, "base"), "data": key_of(run, "data"),
                           "ids": config_hash(ids)})
        out = run.shared("train", name, key)
        if m := finished(out, key):
            results[name] = m
            _record(run, f"train/{name}", m, out)
            continue
        t0 = time.time()
        with tracking.stage_run(cfg, f"train-{name}", run.run_dir) as trun:
            info = train_model(run, [pool[k] for k in pool.positions_of(ids)], out, trun)
            tracking.log_summary(trun, {f"train/{k}": v for k, v in info.items()})
        results[name] = _record(run, f"train/{name}", finish(out, key, t0, selector=name, **info), out)
        print(f"[icons] trained {name}: {info['examples']} examples, loss {info['loss_first']:.3f} -> "
              f"{info['loss_last']:.3f} in {results[name]['wall_s']:.0f}s", flush=True)
    return results


# ---------------------------------------------------------------- step 6a: evaluation hand-off
def stage_export(run: Run) -> dict:
    """Each trained model as a merged HF LLaVA checkpoint for lmms-eval's ``llava_hf``, with the
    command that evaluates it on the paper's ten benchmarks (``export.py``); shared like the model."""
    from .export import FORMAT, export_trained, model_image_processor

    cfg = run.cfg
    wanted = cfg.export.selectors if cfg.export.selectors is not None else cfg.selectors
    trained = read_json(run.run_dir / "stages.json")
    results = {}
    for name in [icons_name(cfg) if s == "icons" else s for s in wanted]:
        if f"train/{name}" not in trained:
            raise FileNotFoundError(f"no trained model {name!r} in {run.run_dir}: run the train stage first")
        key = config_hash({"train": trained[f"train/{name}"]["key"], "format": FORMAT})  # train's key covers the model
        out = run.shared("export", name, key)
        info = export_trained(stage_path(run, f"train/{name}") / "model", out, key, cfg.model.template,
                              model_image_processor(cfg.model), base=lambda: load_base(run),
                              tasks=list(cfg.export.lmms_tasks), num_processes=cfg.export.num_processes)
        results[name] = _record(run, f"export/{name}", info, out)
        print(f"[icons] exported {name} ({info['dtype']}) to {out}; evaluate with:\n  {info['lmms_eval']}", flush=True)
    return results


# ---------------------------------------------------------------- step 6b: evaluate
def evaluate_model(run: Run, model_dir: Path | None) -> dict:
    from .data.mini_llava import LONG_ANSWER_TASKS
    from .evaluate import evaluate_task
    from .features.sharded import compute_device

    cfg = run.cfg
    model, tok = load_base(run) if model_dir is None else load_model(run, model_dir)
    model.to(compute_device(cfg.trainer))
    paths = data_paths(run)
    enc = make_encoder(run, tok)
    out = {}
    for task in cfg.tasks.names:
        n_new = cfg.eval.max_new_tokens_long if task in LONG_ANSWER_TASKS else cfg.eval.max_new_tokens
        out[task] = evaluate_task(model, enc, task, read_json(paths.test[task]), n_new, cfg.eval.batch_size)
    return out


def stage_eval(run: Run) -> dict:
    from .evaluate import chance

    cfg = run.cfg
    if cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks":  # validate() refuses this config first
        raise ConfigError("config error: the eval stage needs test splits, which tasks.kind=llava_benchmarks does "
                          "not have: evaluate the trained models with lmms-eval (README, Real scale)")
    paths = data_paths(run)
    write_json(run.run_dir / "eval" / "chance.json", {t: chance(t, read_json(paths.test[t])) for t in cfg.tasks.names})
    results = {}
    for name in ["base", *selector_names(cfg)]:
        model_key = key_of(run, "base" if name == "base" else f"train/{name}")
        model_dir = None if name == "base" else stage_path(run, f"train/{name}") / "model"
        key = config_hash({"eval": section(cfg, "eval", "tasks"), "model": model_key, "data": key_of(run, "data")})
        out = run.shared("eval", name, key)
        if m := finished(out, key):
            results[name] = _record(run, f"eval/{name}", m, out)
            continue
        t0 = time.time()
        with tracking.stage_run(cfg, f"eval-{name}", run.run_dir) as erun:
            metrics = evaluate_model(run, model_dir)
            # every generated answer, for error analysis (e.g. which letter an MC model always picks)
            write_jsonl(out / "predictions.jsonl",
                        [{"task": t, **row} for t, v in metrics.items() for row in v.pop("predictions")])
            write_json(out / "metrics.json", metrics)
            tracking.log_summary(erun, {f"eval/{t}": v["score"] for t, v in metrics.items()})
            tracking.log_files(erun, f"eval-{name}", "eval", [out / "metrics.json", out / "predictions.jsonl"])
        results[name] = _record(run, f"eval/{name}",
                                finish(out, key, t0, scores={t: v["score"] for t, v in metrics.items()}), out)
        print(f"[icons] evaluated {name} in {results[name]['wall_s']:.0f}s: "
              + " ".join(f"{t}={v['score']:.1f}" for t, v in metrics.items()), flush=True)
    return results


# ---------------------------------------------------------------- report
def stage_report(run: Run) -> dict:
    from .report import write_report

    t0 = time.time()
    path = write_report(run)
    print(f"[icons] report: {path}", flush=True)
    return {"report": str(path), "wall_s": round(time.time() - t0, 2)}


def stage_check(run: Run) -> dict:
    """Validate the pool and every task file before any model work (``check.py``)."""
    from .check import run_check

    return run_check(run)


STAGES = {"check": stage_check, "data": stage_data, "base": stage_base, "warmup": stage_warmup,
          "features": stage_features,
          "scores": stage_scores, "select": stage_select, "subset": stage_subset, "train": stage_train,
          "export": stage_export, "eval": stage_eval, "report": stage_report}


#: stages every process of a torchrun/srun job runs (each its share); rank 0 runs the others alone
DATA_PARALLEL = {"warmup", "features", "train"}


def run_stages(cfg: DictConfig, run_dir: Path, study_dir: Path | None = None) -> dict:
    torch.set_flush_denormal(True)  # small LoRA gradients are otherwise 40-250x slower on CPU
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    run = Run(cfg, Path(run_dir), Path(study_dir or run_dir))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    rank, _ = init_distributed()  # launched by torchrun/srun: join the group (a no-op for one process)
    results = {}
    with lock_run_dir(run.run_dir) if rank == 0 else nullcontext():
        for name in cfg.stages:
            if name not in STAGES:
                raise ValueError(f"stage {name!r} is not implemented; available: {sorted(STAGES)}")
            t0 = time.time()
            if rank == 0 or name in DATA_PARALLEL:
                results[name] = STAGES[name](run)
            barrier()  # the next stage reads what this one wrote
            if rank == 0:
                timing_path = run.run_dir / "timings.json"
                timing = read_json(timing_path) if timing_path.exists() else {}
                timing[name] = round(time.time() - t0, 2)
                write_json(timing_path, timing)
    return results
