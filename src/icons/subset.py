"""Step 5 output: the selected subset as LLaVA-format JSON, plus what it is made of.

``subset.json`` holds the selected source records exactly as the file has them (the same objects,
keys in the same order, repeated ids included; no repair): a drop-in LLaVA training file;
``composition.json`` compares the subset's make-up by family, label noise and duplicates (from the
pool's side metadata, which the selector never saw) with the pool's.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from .io import write_json, write_json_list


def composition(meta_rows: list[dict]) -> dict:
    n = len(meta_rows)
    fam = Counter(m["family"] for m in meta_rows)
    return {"n": n,
            "family": {k: round(v / n, 4) for k, v in sorted(fam.items())},
            "label_noise": round(sum(m.get("noise") == "label" for m in meta_rows) / n, 4),
            "garbage": round(sum(m.get("noise") == "garbage" for m in meta_rows) / n, 4),
            "duplicates": round(sum("dup_of" in m for m in meta_rows) / n, 4)}


def subset_rows(pool, indices: Sequence[int], ids: list) -> Iterator[dict]:
    """The selected source records, read one at a time by pool row; each must carry the id the
    selection recorded for it (a pool that changed under the selection is caught, never written)."""
    if len(indices) != len(ids):
        raise ValueError(f"selection has {len(indices)} indices but {len(ids)} ids")
    for k, (i, rid) in enumerate(zip(indices, ids)):
        rec = pool.raw(int(i))
        if rec.get("id") != rid:
            raise KeyError(f"selected row {k}: pool index {int(i)} holds id {rec.get('id')!r}, the selection says "
                           f"{rid!r} (the pool changed since the selection; select again)")
        yield rec


def write_subset(pool, indices: Sequence[int], ids: list, meta: list[dict] | None, out: Path) -> dict:
    """``subset.json`` (streamed: the subset of a large pool is never all in memory) and, with the
    pool's side metadata (one row per pool row, in pool order), ``composition.json``."""
    write_json_list(out / "subset.json", subset_rows(pool, indices, ids))
    stats: dict = {"n": len(ids)}
    if meta is not None:
        if len(meta) != len(pool):
            raise ValueError(f"pool metadata has {len(meta)} rows for a pool of {len(pool)}")
        sub, full = composition([meta[int(i)] for i in indices]), composition(meta)
        enrichment = {f: round(sub["family"].get(f, 0.0) / share, 3) for f, share in full["family"].items() if share}
        stats.update({"subset": sub, "pool": full, "enrichment": enrichment})
        write_json(out / "composition.json", stats)
    return stats
