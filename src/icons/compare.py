"""``python -m icons.compare DIR [DIR ...]``: one table across runs (e.g. a multirun's jobs).

Finds every ``report.json`` under the given directories and prints, per run and model, the
run's Hydra overrides, the per-task scores, ``rel_cc`` and ``rel``. ``--out FILE`` also writes the
table as markdown.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .io import atomic_write_text, read_json


def overrides(run_dir: Path) -> str:
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.exists():
        return ""
    lines = [ln.strip()[2:] for ln in p.read_text().splitlines() if ln.strip().startswith("- ")]
    return " ".join(ln for ln in lines if not ln.startswith(("run_dir=", "hydra.")))


def collect(dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    header: list[str] | None = None
    rows = []
    for d in dirs:
        for rep in sorted(d.rglob("report.json")):
            data = read_json(rep)
            cols = data["columns"]
            if header is None:
                header = ["run", "overrides", *cols]
            elif cols != header[2:]:
                raise ValueError(f"{rep}: columns differ from the first report's")
            for row in data["rows"]:
                if row[0] == "chance" and rows:
                    continue
                rows.append([str(rep.parent), overrides(rep.parent), *row])
    if header is None:
        raise FileNotFoundError(f"no report.json under {', '.join(map(str, dirs))}")
    return header, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    header, rows = collect(a.dirs)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(md))
    if a.out:
        atomic_write_text(a.out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
