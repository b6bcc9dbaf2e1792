"""The baselines by name: what each reads and how its rows are chosen (the functions of
``baselines.py`` over the stores the ``forward`` stage wrote). A new selector is one function here
with its ``@baseline`` line, and its name in ``config.selector.BASELINE_CHOICES``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .baselines import band, by_length, clip_score, coincide, d2_pruning, rds_table, semdedup
from .store import load_column

#: records per k-means cluster when ``clusters`` is null: LLaVA-665K's 10,000 clusters in SemDeDup's
#: and COINCIDE's runs on it
RECORDS_PER_CLUSTER = 66.5


@dataclass
class SelectorInputs:
    """What a baseline may read: the forward stores by model (``base``, ``warmup``, ``clip``), the
    validation records' tasks, the task names and the answer lengths (from the tokenizer)."""

    n: int
    stores: dict[str, Path]
    val_tasks: list[str]
    tasks: list[str]
    answer_lengths: Callable[[], np.ndarray]

    def column(self, model: str, name: str, prefix: str = "pool") -> np.ndarray:
        if model not in self.stores:
            raise FileNotFoundError(f"no {model} forward store in this run: run the forward stage")
        col = np.asarray(load_column(self.stores[model], name, prefix), dtype=np.float32)
        return col[:, 0] if col.shape[1] == 1 else col

    def meta(self, model: str) -> dict:
        from ..io import read_json

        return read_json(self.stores[model] / "pool_meta.json")


@dataclass(frozen=True)
class Baseline:
    """A selector: the stores it reads and ``choose(inputs, k, cfg, seed) -> (rows, manifest extra)``
    (``cfg``: the ``selector`` group)."""

    name: str
    needs: tuple[str, ...]
    choose: Callable


SELECTORS: dict[str, Baseline] = {}


def baseline(name: str, needs: tuple[str, ...] = ()):
    def register(fn):
        SELECTORS[name] = Baseline(name, needs, fn)
        return fn
    return register


def clusters_for(n: int, clusters: int | None) -> int:
    return max(1, min(n, clusters if clusters is not None else round(n / RECORDS_PER_CLUSTER)))


def choose(name: str, inp: SelectorInputs, k: int, cfg, seed: int) -> tuple[np.ndarray, dict]:
    """(pool rows, what the manifest should say) of baseline ``name``."""
    if name not in SELECTORS:
        raise ValueError(f"unknown baseline selector {name!r}; known: {', '.join(SELECTORS)}")
    return SELECTORS[name].choose(inp, k, cfg, seed)


@baseline("length")
def _length(inp, k, cfg, seed):
    return by_length(inp.answer_lengths(), k), {}


@baseline("perplexity", ("base",))
def _perplexity(inp, k, cfg, seed):
    return band(inp.column("base", "loss"), k, cfg.perplexity.band), {"band": cfg.perplexity.band}


@baseline("el2n", ("warmup",))
def _el2n(inp, k, cfg, seed):
    return band(inp.column("warmup", "el2n"), k, cfg.el2n.band), {"band": cfg.el2n.band}


@baseline("semdedup", ("base",))
def _semdedup(inp, k, cfg, seed):
    c = clusters_for(inp.n, cfg.semdedup.clusters)
    return semdedup(inp.column("base", "embed"), k, c, seed), {"clusters": c}


@baseline("d2_pruning", ("base", "warmup"))
def _d2_pruning(inp, k, cfg, seed):
    d = cfg.d2_pruning
    return d2_pruning(inp.column("base", "embed"), inp.column("warmup", "el2n"), k, d.neighbours,
                                d.gamma_forward, d.gamma_reverse), {}


@baseline("coincide", ("base",))
def _coincide(inp, k, cfg, seed):
    c = clusters_for(inp.n, cfg.coincide.clusters)
    feats = inp.column("base", "coincide")
    n_layers = len(inp.meta("base")["layers"])
    # each layer's block is (image mean, text mean): transferability reads the text halves
    text = np.arange(feats.shape[1]).reshape(n_layers, 2, -1)[:, 1].reshape(-1)
    return coincide(feats, k, c, seed, cfg.coincide.tau, cfg.coincide.sigma, text_parts=text), {"clusters": c}


@baseline("rds", ("base",))
def _rds(inp, k, cfg, seed):
    from .. import consensus

    pool, val = inp.column("base", "embed_weighted"), inp.column("base", "embed_weighted", prefix="val")
    table = rds_table(pool, val, inp.val_tasks, inp.tasks)
    method = cfg.rds.consensus
    return consensus.select_k(table, k, method), {"consensus": method}


@baseline("clip_score", ("clip",))
def _clip_score(inp, k, cfg, seed):
    return clip_score(inp.column("clip", "clip_score"), k), {}
