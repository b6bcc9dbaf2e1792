"""The study's figures (PNG, matplotlib's Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import _pyplot, _save


def ratio_curves(path: Path, ratio: dict, summary: dict, paper: dict, main_ratio: float) -> Path:
    """Relative performance against the selection ratio: this run (the main ratio with its seed
    spread) and the paper's figure (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, colour in (("random", "tab:green"), ("icons", "tab:red")):
        xs = sorted(ratio[name])
        ax.plot(xs, [ratio[name][x] for x in xs], "o-", color=colour, label=f"{name} (miniature)")
        s = summary[name]["rel"]
        if s["n"] > 1:
            ax.errorbar([main_ratio], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]],
                        color=colour, capsize=4)
        px = sorted(paper[name])
        ax.plot(px, [paper[name][x] for x in px], "--", color=colour, alpha=0.6, label=f"{name} (paper, 7B)")
    ax.axhline(100, color="grey", lw=0.8)
    ax.set_xlabel("selection ratio")
    ax.set_ylabel("relative performance (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def heatmaps(path: Path, names: list[str], ours: np.ndarray, theirs: np.ndarray | None, left: str,
             right: str | None) -> Path:
    """One or two overlap matrices side by side, cells annotated."""
    plt = _pyplot()
    mats = [(ours, left)] + ([(theirs, right)] if theirs is not None else [])
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.6), squeeze=False)
    for ax, (m, title) in zip(axes[0], mats):
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < 60 else "black")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="overlap (%)")
    return _save(fig, path)


def rel_bars(path: Path, summary: dict) -> Path:
    """Each model's relative performance, mean over seeds with the min-max range."""
    plt = _pyplot()
    names = [n for n in summary if n != "full"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(names)), 3.2))
    means = [summary[n]["rel"]["mean"] for n in names]
    lo = [summary[n]["rel"]["mean"] - summary[n]["rel"]["min"] for n in names]
    hi = [summary[n]["rel"]["max"] - summary[n]["rel"]["mean"] for n in names]
    ax.bar(names, means, yerr=[lo, hi], capsize=4, color="tab:blue")
    ax.axhline(100, color="grey", lw=0.8)
    ax.set_ylabel("relative performance (%)")
    ax.set_ylim(0, max(105, max(means) + 10))
    return _save(fig, path)


def score_hists(path: Path, scores: np.ndarray, tasks: list[str], percentile: float) -> Path:
    """Each task's score distribution over the pool, its vote threshold marked."""
    plt = _pyplot()
    cols = 5
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        ax.hist(scores[:, k], bins=60, color="tab:blue")
        ax.axvline(np.quantile(scores[:, k], percentile / 100, method="higher"), color="tab:red", lw=1)
        ax.set_title(t, fontsize=8)
        ax.tick_params(labelsize=6)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    return _save(fig, path)


def vote_hist(path: Path, votes: np.ndarray, selected: np.ndarray) -> Path:
    """How many tasks vote for each pool record, for the pool and for the ICONS subset."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.arange(votes.max() + 2) - 0.5
    ax.hist(votes, bins=bins, alpha=0.6, label="pool", color="tab:grey")
    ax.hist(votes[selected], bins=bins, alpha=0.8, label="icons subset", color="tab:red")
    ax.set_xlabel("votes (tasks whose top 20% hold the record)")
    ax.set_ylabel("records")
    ax.legend(fontsize=8)
    return _save(fig, path)
