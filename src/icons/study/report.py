"""The miniature study's report: ``study_report.md``, ``study.json`` and ``plots/*.png`` under the run
directory, and on W&B as tables and images. Built from the sub-runs' files alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import tracking
from ..consensus import GREEDY
from ..evaluate import relative
from ..io import atomic_write_text, read_json, write_json
from . import analyses as A
from . import paper
from . import plots


def _sub(run_dir: Path) -> dict:
    """What one sub-run left: scores per evaluated model, chance, task scores, selections."""
    st = read_json(run_dir / "stages.json")
    evals = {k.split("/", 1)[1]: read_json(Path(v["path"]) / "manifest.json")["scores"]
             for k, v in st.items() if k.startswith("eval/")}
    sel = {}
    for d in sorted((run_dir / "selection").glob("*")):
        if (d / "indices.npy").exists():
            sel[d.name] = {"rows": np.load(d / "indices.npy"),
                           "composition": read_json(d / "subset" / "composition.json")
                           if (d / "subset" / "composition.json").exists() else None}
    sdir = Path(st["scores"]["path"])
    return {"evals": evals, "chance": read_json(run_dir / "eval" / "chance.json"), "selections": sel,
            "scores": np.load(sdir / "task_scores.npy"), "tasks": read_json(sdir / "tasks.json"),
            "votes": np.load(run_dir / "selection" / "icons" / "votes.npy")
            if (run_dir / "selection" / "icons" / "votes.npy").exists() else None}


def paper_overlap(tasks: list[str]) -> np.ndarray:
    """The paper's per-task top-20% overlaps for these tasks (in their order)."""
    idx = [paper.TASKS.index(t) for t in tasks]
    return np.array(paper.TOP20_OVERLAP)[np.ix_(idx, idx)]


def _rel(scores: dict, full: dict, chance: dict) -> tuple[float, float]:
    return relative(scores, full), relative(scores, full, chance)


def _fmt(x: float, d: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{d}f}"


def _pm(s: dict) -> str:
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])}" if s["n"] > 1 else _fmt(s["mean"])


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]


def _share(sel: dict, name: str, family: str) -> float | None:
    comp = sel.get(name, {}).get("composition") or {}
    return comp.get("subset", {}).get("family", {}).get(family)


def _summary(summary: dict, spec: dict, fidelity: dict, sel0: dict, goals: dict) -> list[str]:
    """The study in one screen: the ordering, and the measurements that explain it."""
    rel = {n: s["rel"] for n, s in summary.items() if n != "full"}
    order = sorted(rel, key=lambda n: -rel[n]["mean"])
    lines = ["## Summary", "", "Relative performance over seeds (mean ± sample std, [min, max]): " + "; ".join(
        f"{n} {_fmt(rel[n]['mean'])} ± {_fmt(rel[n]['std'])} [{_fmt(rel[n]['min'])}, {_fmt(rel[n]['max'])}]"
        for n in order) + "."]
    if spec:
        lines.append(f"- Each task's own top 20% (its specialist) beats random on "
                     f"{sum(v['specialist'] > v['random'] for v in spec.values())} of {len(spec)} tasks; the vote's "
                     f"subset shares {_fmt(np.mean([v['overlap'] for v in spec.values()]))}% of a specialist's on "
                     f"average (the paper: 3-24%).")
    lines.append(f"- The tasks agree little: their score columns correlate at {fidelity['mean_pair_correlation']:.2f} on "
                 f"average, their top-20% sets overlap {fidelity['mean_pair_overlap']:.1f}% (chance 20%), mmbench en/cn "
                 f"{fidelity['mmbench_en_cn_overlap']:.1f}% (the paper: 67.4%).")
    lines += _goal_lines(goals)
    pool = (sel0.get("icons", {}).get("composition") or {}).get("pool", {}).get("family", {})
    shares = ", ".join(f"{n} {_fmt(100 * _share(sel0, n, 'conv'))}%" for n in ("random", "icons", *GREEDY)
                       if _share(sel0, n, "conv") is not None)
    if pool.get("conv") is not None:
        lines.append(f"- So the vote keeps what many short-answer tasks like and starves what one task wants: "
                     f"conversations are {_fmt(100 * pool['conv'])}% of the pool; of the subsets: {shares} (first seed).")
    return lines


def goal_check(summary: dict, name: str, against: str = "random") -> dict:
    """``name`` against ``against`` over seeds: its rel margin, the larger of the two rel spreads
    (sample std), and the tasks where it falls below by more than the larger of their two spreads."""
    a, b = summary[name], summary[against]
    below = {t: round(b["tasks"][t]["mean"] - s["mean"], 1) for t, s in a["tasks"].items()
             if b["tasks"][t]["mean"] - s["mean"] > max(s["std"], b["tasks"][t]["std"])}
    margin, spread = a["rel"]["mean"] - b["rel"]["mean"], max(a["rel"]["std"], b["rel"]["std"])
    return {"margin": margin, "spread": spread, "below": below, "met": margin > spread and not below}


def goal_checks(summary: dict) -> dict:
    """``goal_check`` against random for each consensus beyond the paper run at several seeds."""
    if "random" not in summary:
        return {}
    return {n: goal_check(summary, n) for n in GREEDY if n in summary and summary[n]["rel"]["n"] > 1}


def _goal_lines(checks: dict) -> list[str]:
    """Whether a consensus beyond the paper beats random (the study's goal, ``goal_checks``), said
    with its numbers."""
    if not checks:
        return []
    parts = [f"{n} {c['margin']:+.1f} rel (spread {c['spread']:.1f})" + (
        f", below random on {', '.join(f'{t} by {d:.1f}' for t, d in c['below'].items())}"
        if c["below"] else ", no task below random beyond its spread") for n, c in checks.items()]
    met = [n for n, c in checks.items() if c["met"]]
    verdict = f"met by {', '.join(met)}" if met else "not met by any of them"
    return [f"- Against random over seeds (goal: rel above by more than the larger seed spread, no task below "
            f"by more than the larger of its two spreads): {'; '.join(parts)}. The goal is {verdict}."]


def _recipe(cfg) -> str:
    """A (sub-)run's feature recipe in words: gradient kind, warmup and checkpoints."""
    w = cfg.warmup
    stop = f", stopped at {w.stop_after:.0%} of its steps" if w.stop_after else ""
    return (f"{cfg.gradient.kind}; warmup on {w.fraction:.0%} of the pool, {w.epochs} epoch"
            f"{'s' if w.epochs > 1 else ''}{stop}; "
            + ("every checkpoint, lr-weighted" if w.checkpoints == "all" else "the last checkpoint"))


def write_study_report(run, subs, sub_cfgs: dict) -> Path:
    """``sub_cfgs``: each sub-run's config, by name."""
    cfg, out = run.cfg, run.run_dir
    runs = {s.name: _sub(out / "study" / s.name) for s in subs}
    seeds = [s for s in subs if s.kind == "seed"]
    first = runs[seeds[0].name]
    tasks = first["tasks"]
    chance = first["chance"]
    full0 = first["evals"]["full"]
    main_sel = ["full", *[n for n in cfg.study.selectors if n != "full"]]
    md = [f"# icons miniature study: {cfg.experiment_name}", "",
          f"Seeds {list(cfg.study.seeds)} (warmup order and subset, LoRA init, training order); selection ratio "
          f"{cfg.selection.ratio}; relative performance against "
          + ("each seed's own full-data model." if cfg.study.full_every_seed else
             f"the full-data model of seed {cfg.study.seeds[0]} (one full training; its seed spread is in "
             f"docs/findings.md)."), ""]
    # ---- main table
    per = {n: {"tasks": {t: [] for t in tasks}, "rel": [], "rel_cc": []} for n in main_sel}
    for s in seeds:
        r = runs[s.name]
        full = r["evals"].get("full", full0)
        for n in main_sel:
            if n not in r["evals"]:
                continue
            for t in tasks:
                per[n]["tasks"][t].append(r["evals"][n][t])
            rel, rel_cc = _rel(r["evals"][n], full, r["chance"])
            per[n]["rel"].append(rel)
            per[n]["rel_cc"].append(rel_cc)
    summary = {n: {"tasks": {t: A.seed_summary(v) for t, v in d["tasks"].items()},
                   "rel": A.seed_summary(d["rel"]), "rel_cc": A.seed_summary(d["rel_cc"])} for n, d in per.items()}
    rows = [["chance", *[_fmt(chance[t]) for t in tasks], "-", "-"]]
    rows += [[n, *[_pm(s["tasks"][t]) for t in tasks], _pm(s["rel_cc"]), _pm(s["rel"])] for n, s in summary.items()]
    md += ["## Main table (test scores, mean ± sample std over seeds)", ""]
    md += _table(["model", *tasks, "rel_cc", "rel"], rows)
    # ---- specialist vs generalist
    sel0 = first["selections"]
    icons_rows = sel0["icons"]["rows"]
    spec_rows = []
    spec = {}
    for t in tasks:
        name = f"specialist-{t}"
        if name not in first["evals"]:
            continue
        ov = A.overlap(sel0[name]["rows"], icons_rows)
        spec[t] = {"specialist": first["evals"][name][t], "random": first["evals"]["random"][t],
                   "icons": first["evals"]["icons"][t], "overlap": ov}
        spec_rows.append([t, _fmt(spec[t]["specialist"]), _fmt(spec[t]["random"]), _fmt(spec[t]["icons"]),
                          _fmt(ov), _fmt(paper.SPECIALIST_OVERLAP.get(t))])
    if spec_rows:
        md += ["", "## Specialist against generalist (first seed): each task's own top 20%, tested on that task", ""]
        md += _table(["task", "specialist", "random", "icons", "overlap with icons (%)", "paper's overlap (%)"],
                     spec_rows)
        wins = sum(v["specialist"] > v["random"] for v in spec.values())
        md += ["", f"The specialist beats random on {wins} of {len(spec)} tasks; icons beats random on "
                   f"{sum(v['icons'] > v['random'] for v in spec.values())}."]
    # ---- aggregation ablation
    agg = ["icons", *[m for m in cfg.study.aggregation], *[m for m in GREEDY if m in sel0]]
    agg = [m for m in agg if m in first["evals"] and m in sel0]
    names, m = A.overlap_matrix({("vote" if a == "icons" else a): sel0[a]["rows"] for a in agg})
    md += ["", "## Aggregation (first seed)", ""]
    md += _table(["method", "rel", "rel_cc", "paper's rel"],
                 [[nm, *[_fmt(x) for x in _rel(first["evals"][a], full0, chance)],
                   _fmt(paper.AGGREGATION_REL.get(nm))] for nm, a in zip(names, agg)])
    md += ["", "Selection overlap between methods (% of the subset):", ""]
    md += _table(["", *names], [[a, *[_fmt(x) for x in row]] for a, row in zip(names, m)])
    # ---- ratio sweep
    ratio = {"random": {cfg.selection.ratio: summary["random"]["rel"]["mean"]},
             "icons": {cfg.selection.ratio: summary["icons"]["rel"]["mean"]}}
    for s in (s for s in subs if s.kind == "ratio"):
        for n in ("random", "icons"):
            ratio[n][s.overrides["selection.ratio"]] = relative(runs[s.name]["evals"][n], full0)
    rs = sorted(ratio["icons"])
    md += ["", "## Selection ratio (first seed; at the main ratio, the mean over seeds)", ""]
    md += _table(["ratio", "random rel", "icons rel", "paper random", "paper icons"],
                 [[f"{r:g}", _fmt(ratio["random"].get(r)), _fmt(ratio["icons"].get(r)),
                   _fmt(paper.RATIO_REL["random"].get(r)), _fmt(paper.RATIO_REL["icons"].get(r))] for r in rs])
    # ---- per-task top-20% overlap and score correlations
    masks = A.top_masks(first["scores"], 0.2)
    ov = A.mask_overlaps(masks)
    corr = A.pair_correlations(first["scores"], tasks)
    ours, theirs = A.upper(ov), A.upper(paper_overlap(tasks))
    en, cn = tasks.index("mmbench_en"), tasks.index("mmbench_cn")
    fidelity = {"mean_pair_correlation": float(np.mean(list(corr.values()))),
                "mmbench_en_cn_overlap": float(ov[en, cn]), "mmbench_en_cn_correlation": corr[("mmbench_en", "mmbench_cn")],
                "overlap_vs_paper_pearson": float(np.corrcoef(ours, theirs)[0, 1]), "mean_pair_overlap": float(ours.mean())}
    md += ["", "## Per-task top-20% overlap (first seed) beside the paper's", "",
           f"Mean pairwise overlap {fidelity['mean_pair_overlap']:.1f}% (chance 20%; the paper's "
           f"{theirs.mean():.1f}%); mmbench_en/cn {fidelity['mmbench_en_cn_overlap']:.1f}% (the paper's 67.4%); "
           f"Pearson of the 45 pairs' overlaps with the paper's {fidelity['overlap_vs_paper_pearson']:.2f}; "
           f"mean correlation of the task score columns {fidelity['mean_pair_correlation']:.2f} (mmbench_en/cn "
           f"{fidelity['mmbench_en_cn_correlation']:.2f})."]
    # ---- feature choices
    feats = {}
    for s in (s for s in subs if s.kind == "features"):
        r = runs[s.name]
        ov2 = A.mask_overlaps(A.top_masks(r["scores"], 0.2))
        c2 = A.pair_correlations(r["scores"], tasks)
        feats[s.name.removeprefix("features-")] = {
            "recipe": _recipe(sub_cfgs[s.name]),
            "overlap_with_default": A.overlap(r["selections"]["icons"]["rows"], icons_rows),
            "rel": relative(r["evals"]["icons"], full0),
            "mean_pair_correlation": float(np.mean(list(c2.values()))),
            "mmbench_en_cn_overlap": float(ov2[en, cn]),
            "overlap_vs_paper_pearson": float(np.corrcoef(A.upper(ov2), theirs)[0, 1]),
            "conv_share": (r["selections"]["icons"]["composition"] or {}).get("subset", {}).get("family", {}).get("conv")}
    if feats:
        conv0 = (sel0["icons"]["composition"] or {}).get("subset", {}).get("family", {}).get("conv")
        md += ["", "## Feature recipes (first seed): icons with each", ""]
        md += _table(["recipe", "overlap with default (%)", "icons rel (first seed)", "mean task correlation",
                      "mmbench en/cn top-20% overlap (%)", "top-20% overlaps vs the paper's (Pearson)",
                      "conversation share"],
                     [[f"default ({_recipe(cfg)})", "100.0", _fmt(relative(first["evals"]["icons"], full0)),
                       _fmt(fidelity["mean_pair_correlation"], 2), _fmt(fidelity["mmbench_en_cn_overlap"]),
                       _fmt(fidelity["overlap_vs_paper_pearson"], 2), _fmt(conv0, 3)]]
                     + [[f"{k} ({v['recipe']})", _fmt(v["overlap_with_default"]), _fmt(v["rel"]),
                         _fmt(v["mean_pair_correlation"], 2),
                         _fmt(v["mmbench_en_cn_overlap"]), _fmt(v["overlap_vs_paper_pearson"], 2),
                         _fmt(v["conv_share"], 3)] for k, v in feats.items()])
    # ---- figures
    pdir = out / "plots"
    figs = {"ratio": plots.ratio_curves(pdir / "ratio.png", ratio, summary, paper.RATIO_REL, cfg.selection.ratio),
            "top20_overlap": plots.heatmaps(pdir / "top20_overlap.png", tasks, ov, paper_overlap(tasks),
                                            "this run (first seed)", "the paper (7B, LLaVA-665K)"),
            "aggregation_overlap": plots.heatmaps(pdir / "aggregation_overlap.png", names, m, None, "this run", None),
            "rel": plots.rel_bars(pdir / "rel.png", summary),
            "score_distributions": plots.score_hists(pdir / "score_distributions.png", first["scores"], tasks, 80)}
    if first["votes"] is not None:
        figs["votes"] = plots.vote_hist(pdir / "votes.png", first["votes"], icons_rows)
    comps = {n: v["composition"] for n, v in sel0.items() if v["composition"] and not n.startswith("specialist-")}
    if comps:
        from ..plots import composition

        figs["composition"] = composition(pdir / "study_composition.png", comps)
    md += ["", "Figures: " + ", ".join(f"[{k}](plots/{p.name})" for k, p in figs.items()), ""]
    goals = goal_checks(summary)
    md[4:4] = _summary(summary, spec, fidelity, sel0, goals) + [""]
    path = out / "study_report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    data = {"summary": summary, "specialists": spec, "aggregation_overlap": {"names": names, "matrix": m.tolist()},
            "ratio": {n: {str(k): v for k, v in d.items()} for n, d in ratio.items()}, "top20_overlap": ov.tolist(),
            "goal": goals,
            "fidelity": fidelity, "features": feats, "figures": {k: str(p) for k, p in figs.items()}}
    write_json(out / "study.json", data)
    with tracking.stage_run(cfg, "study", out) as wrun:
        tracking.log_table(wrun, "study/main", ["model", *tasks, "rel_cc", "rel"], rows)
        tracking.log_images(wrun, {f"study/{k}": p for k, p in figs.items()})
        tracking.log_files(wrun, "study", "report", [path, out / "study.json", *figs.values()])
    return path
