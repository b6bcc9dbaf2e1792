"""``python -m icons.data.benchmarks <task> --src ... --out DIR [--n 500] [--seed 0]``."""
from __future__ import annotations

import argparse
import sys

from . import TASKS, EvaluatedSplitError, SourceError, convert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m icons.data.benchmarks",
        description="Build a target task's validation set (LLaVA conversation format) from the benchmark's own "
                    "files, from a split the task is not evaluated on.",
        epilog="sources per task:\n" + "\n".join(f"  {t:11s} {what}" for t, (_, what) in TASKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--src", nargs="+", required=True, help="the benchmark's files, in the order listed below")
    ap.add_argument("--out", required=True, help="output directory (<task>.json, <task>.meta.json)")
    ap.add_argument("--n", type=int, default=500, help="records to sample (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default=None, help="sqa: pid_splits key (default val); gqa/llavaw: override the "
                                                  "split read from the file name")
    ap.add_argument("--image-prefix", default=None,
                    help="prepended to the benchmark's image paths (default: LLaVA's playground/data layout)")
    ap.add_argument("--image-root", default=None,
                    help="where the records' image paths start (data.image_root, e.g. playground/data): llavaw "
                         "(COCO) checks its images there, as val2014 names or bare COCO numbers")
    ap.add_argument("--holdout", action="store_true",
                    help="mme, mmbench_*, llavaw in-the-wild: carve the set out of the evaluated benchmark and "
                         "list its ids for exclusion from evaluation")
    a = ap.parse_args(argv)
    try:
        path = convert(a.task, a.src, a.out, a.n, a.seed, a.split, a.image_prefix, a.holdout, a.image_root)
    except (EvaluatedSplitError, SourceError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
