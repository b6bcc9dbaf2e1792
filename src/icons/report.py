"""The study's report: per-task test scores by model, relative performance, subset composition,
wall time per stage; as ``report.md``, ``report.json``, PNG figures in ``plots/`` and, on W&B, a
table and images.

Rows are named by selector (``base``, ``full``, ``random``, ``icons`` or the consensus variant)
so scripts can parse the table; ``rel`` is the paper's relative performance (mean over tasks of
score / full x 100) and ``rel_cc`` its chance-corrected form (mean of (s - chance) / (full - chance)
x 100).
"""
from __future__ import annotations

from pathlib import Path

from . import plots, tracking
from .evaluate import relative
from .export import INFO
from .io import atomic_write_text, read_json, write_json


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def score_table(tasks: list[str], scores: dict[str, dict[str, float]], chance: dict[str, float]):
    has_full = "full" in scores
    cols = ["model", *tasks] + (["rel_cc", "rel"] if has_full else [])
    rows = [["chance", *[_fmt(chance[t]) for t in tasks]] + (["0.0", "-"] if has_full else [])]
    for name, s in scores.items():
        row = [name, *[_fmt(s[t]) for t in tasks]]
        if has_full:
            sub = {t: s[t] for t in tasks}
            row += [_fmt(relative(sub, scores["full"], chance)), _fmt(relative(sub, scores["full"]))]
        rows.append(row)
    return cols, rows


def _md_table(cols, rows) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]


def exports(stages: dict) -> dict[str, dict]:
    """name -> path and lmms-eval command of each checkpoint the export stage wrote."""
    out = {}
    for k, v in stages.items():
        if k.startswith("export/"):
            info = read_json(Path(v["path"]) / INFO)
            out[k.split("/", 1)[1]] = {"path": v["path"], "dtype": info["dtype"], "lmms_eval": info["lmms_eval"]}
    return out


def export_lines(exported: dict[str, dict]) -> list[str]:
    if not exported:
        return []
    md = ["", "Merged HF checkpoints for lmms-eval's `llava_hf` and the command that evaluates each on the "
              "paper's ten benchmarks (also in `<checkpoint>/lmms_eval.sh`):", ""]
    for name, e in exported.items():
        md += [f"- {name} ({e['dtype']}): `{e['path']}`", "", "  ```bash", f"  {e['lmms_eval']}", "  ```", ""]
    return md


def write_report(run, models: list[str] | None = None) -> Path:
    """``models``: the report's rows (``base`` and the selectors), in order; None = every model
    this run evaluated."""
    cfg, run_dir = run.cfg, run.run_dir
    tasks = list(cfg.tasks.names)
    stages = read_json(run_dir / "stages.json")
    if models is None:
        models = [k.split("/", 1)[1] for k in stages if k.startswith("eval/")]
    chance = read_json(run_dir / "eval" / "chance.json")
    scores = {n: read_json(Path(stages[f"eval/{n}"]["path"]) / "manifest.json")["scores"]
              for n in models if f"eval/{n}" in stages}
    cols, rows = score_table(tasks, scores, chance)
    md = [f"# icons report: {cfg.experiment_name}", "", f"run directory: `{run_dir}`", "",
          f"selection ratio {cfg.selection.ratio}; consensus {cfg.consensus.method} "
          f"(threshold percentile {cfg.consensus.threshold_percentile}, tie-break {cfg.consensus.tie_break}); "
          f"gradient {cfg.gradient.kind}; projection {cfg.projection.kind}"
          + (f" (dim {cfg.projection.dim})" if cfg.projection.kind != "none" else ""), "",
          "Test scores in percent. MME: mean over sub-tasks of (acc + acc+)/2. MMBench: circular "
          "evaluation. LLaVA-W: token F1. chance: a guesser that knows the answer format.", ""]
    md += _md_table(cols, rows)
    comp = {}
    for name in models:
        p = run_dir / "selection" / name / "subset" / "composition.json"
        if p.exists():
            comp[name] = read_json(p)
    if comp:
        fams = sorted(next(iter(comp.values()))["pool"]["family"])
        md += ["", "Composition (share of records) of each subset next to the pool:", ""]
        crow = [["pool", *[f"{next(iter(comp.values()))['pool']['family'].get(f, 0):.3f}" for f in fams],
                 f"{next(iter(comp.values()))['pool']['label_noise']:.3f}",
                 f"{next(iter(comp.values()))['pool']['duplicates']:.3f}"]]
        crow += [[n, *[f"{c['subset']['family'].get(f, 0):.3f}" for f in fams], f"{c['subset']['label_noise']:.3f}",
                  f"{c['subset']['duplicates']:.3f}"] for n, c in comp.items()]
        md += _md_table(["subset", *fams, "label_noise", "duplicates"], crow)
    exported = exports(stages)
    md += export_lines(exported)
    times = {k: v["wall_s"] for k, v in stages.items()}
    md += ["", "Wall time per stage (seconds, when first computed; shared results are reused):", ""]
    md += _md_table(["stage", "wall_s"], [[k, f"{v:.1f}"] for k, v in times.items()])
    figures = plots.report_figures(run_dir / "plots", tasks, scores, chance, comp)
    if figures:
        md += ["", "Figures: " + ", ".join(f"[{k}](plots/{p.name})" for k, p in figures.items()), ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    write_json(run_dir / "report.json", {"columns": cols, "rows": rows, "wall_s": times, "composition": comp,
                                          "exports": exported, "figures": {k: str(p) for k, p in figures.items()}})
    with tracking.stage_run(cfg, "report", run_dir) as wrun:
        for name in scores:  # lineage: the evaluations (and the subsets) the report is made of
            art = stages[f"eval/{name}"].get("artifact")
            if art:
                tracking.use_files(wrun, art["name"], art["type"], art["files"])
        tracking.log_table(wrun, "report", cols, rows)
        tracking.log_images(wrun, {f"report/{k}": p for k, p in figures.items()})
        tracking.log_files(wrun, "report", "report", [path, run_dir / "report.json", *figures.values()])
    return path
