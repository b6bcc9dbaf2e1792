"""Figures for the report (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from .io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def task_scores(path: Path, tasks: list[str], scores: dict[str, dict[str, float]], chance: dict[str, float]) -> Path:
    """Grouped bars: each model's test score per task, chance as a tick per task."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 3.6))
    width = 0.8 / max(1, len(scores))
    for i, (name, s) in enumerate(scores.items()):
        ax.bar([t + i * width for t in range(len(tasks))], [s[t] for t in tasks], width, label=name)
    ax.scatter([t + 0.4 - width / 2 for t in range(len(tasks))], [chance[t] for t in tasks], marker="_", s=400,
               color="black", label="chance", zorder=3)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("test score (%)")
    ax.legend(ncol=min(6, len(scores) + 1), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    return _save(fig, path)


def composition(path: Path, comp: dict[str, dict]) -> Path:
    """Stacked bars: each subset's make-up by family next to the pool's."""
    plt = _pyplot()
    rows = {"pool": next(iter(comp.values()))["pool"]["family"], **{n: c["subset"]["family"] for n, c in comp.items()}}
    fams = sorted({f for r in rows.values() for f in r})
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for j, fam in enumerate(fams):
        vals = [r.get(fam, 0.0) for r in rows.values()]
        ax.barh(list(rows), vals, left=left, color=cmap(j % 20), label=fam)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("share of records")
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.2))
    return _save(fig, path)


def report_figures(out: Path, tasks: list[str], scores: dict, chance: dict, comp: dict) -> dict[str, Path]:
    """The report's figures that its data allows (name -> file)."""
    figs = {}
    if scores:
        figs["task_scores"] = task_scores(out / "task_scores.png", tasks, scores, chance)
    if comp:
        figs["composition"] = composition(out / "composition.png", comp)
    return figs
