"""Step 5 output: the selected subset as LLaVA-format JSON, plus what it is made of.

``subset.json`` holds the pool records exactly as they were (drop-in for LLaVA training);
``composition.json`` compares the subset's make-up by family, label noise and duplicates (from the
pool's side metadata, which the selector never saw) with the pool's.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .io import write_json


def composition(meta_rows: list[dict]) -> dict:
    n = len(meta_rows)
    fam = Counter(m["family"] for m in meta_rows)
    return {"n": n,
            "family": {k: round(v / n, 4) for k, v in sorted(fam.items())},
            "label_noise": round(sum(m.get("noise") == "label" for m in meta_rows) / n, 4),
            "garbage": round(sum(m.get("noise") == "garbage" for m in meta_rows) / n, 4),
            "duplicates": round(sum("dup_of" in m for m in meta_rows) / n, 4)}


def write_subset(pool: list[dict], ids: list[str], meta: list[dict] | None, out: Path) -> dict:
    by_id = {r["id"]: r for r in pool}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"selected ids not in the pool: {missing[:5]}")
    write_json(out / "subset.json", [by_id[i] for i in ids])
    stats: dict = {"n": len(ids)}
    if meta is not None:
        by_meta = {m["id"]: m for m in meta}
        sub, full = composition([by_meta[i] for i in ids]), composition(meta)
        enrichment = {f: round(sub["family"].get(f, 0.0) / share, 3) for f, share in full["family"].items() if share}
        stats.update({"subset": sub, "pool": full, "enrichment": enrichment})
        write_json(out / "composition.json", stats)
    return stats
