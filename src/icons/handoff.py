"""The lmms-eval command and script that evaluate an exported checkpoint on the paper's benchmarks.

``lmms_eval.sh`` (written into every export) first checks that the environment's transformers
reads the exported processor (an export written by transformers 5 needs a recent one), then writes
the task lmms-eval lacks, ``textvqa_val_ocr`` (its ``textvqa_val`` with the OCR tokens in the
prompt, ``lmms_eval_specific_kwargs.default.ocr: true``, as LLaVA-1.5 evaluated TextVQA; lmms-eval
has no command-line switch for it), and runs ``accelerate launch -m lmms_eval``. What the numbers
are: ``vqav2_val`` is VQAv2's validation split, not the test-dev the paper reports (test-dev is
scored only by EvalAI, from ``vqav2_test``'s submission file); MME, MMBench and LLaVA-W hold
icons' validation items, which ``python -m icons.lmms_logs`` leaves out when it re-scores the logs.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

from .config import LMMS_EVAL_TASKS
from .io import atomic_write_text, read_json, write_json

INFO = "icons_export.json"
COMMAND = "lmms_eval.sh"
TASKS_DIR = "lmms_tasks"

#: the tasks icons adds to lmms-eval's (written by the script: they include lmms-eval's own file)
ICONS_TASKS = {"textvqa_val_ocr": ("tasks/textvqa/textvqa_val.yaml", {
    "pre_prompt": "", "post_prompt": "\\nAnswer the question using a single word or phrase.", "ocr": "true"})}


def default_output_path(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".lmms_eval")


def lmms_eval_command(model_dir: str | Path, output_path: str | Path, tasks: Sequence[str] = LMMS_EVAL_TASKS,
                      dtype: str = "bfloat16", num_processes: int = 1) -> str:
    """``accelerate launch -m lmms_eval --model llava_hf ...`` for an exported directory (llava_hf
    generates with batch size 1 only); icons' own tasks come from ``<export>/lmms_tasks``."""
    model_dir = Path(model_dir).resolve()
    if "," in str(model_dir):  # model_args is a comma-separated key=value list
        raise ValueError(f"{model_dir}: lmms-eval's --model_args cannot hold a path with a comma")
    extra = ["--include_path", str(model_dir / TASKS_DIR)] if any(t in ICONS_TASKS for t in tasks) else []
    return shlex.join(["accelerate", "launch", f"--num_processes={int(num_processes)}", "-m", "lmms_eval",
                       "--model", "llava_hf", "--model_args", f"pretrained={model_dir},dtype={dtype}",
                       "--tasks", ",".join(tasks), "--batch_size", "1", "--log_samples", *extra,
                       "--output_path", str(Path(output_path).resolve())])


#: the script's first step: this environment's transformers must read the exported processor
CHECK = '''import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
wrote = json.loads((d / "icons_export.json").read_text()).get("transformers", "?")
try:
    import transformers
    from transformers import AutoProcessor
    AutoProcessor.from_pretrained(d)
except Exception as err:
    have = sys.modules["transformers"].__version__ if "transformers" in sys.modules else "none"
    sys.exit(f"icons: transformers {have} in this environment cannot read the exported processor in {d} "
             f"(written by transformers {wrote}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
             f"install transformers>={wrote} where lmms-eval runs")
'''


def script(cmd: str, tasks: Sequence[str]) -> str:
    lines = ["#!/bin/sh",
             "# lmms-eval's llava_hf on this merged checkpoint (written by icons.export). What the numbers are:",
             "#   vqav2_val: VQAv2's validation split; the paper reports test-dev, which EvalAI scores from the",
             "#     submission file lmms-eval's vqav2_test writes",
             "#   textvqa_val_ocr: lmms-eval's textvqa_val with the OCR tokens in the prompt, as LLaVA-1.5 evaluated",
             "#   mme, mmbench_*_dev, llava_in_the_wild hold icons' validation items; re-score without them:",
             "#     python -m icons.lmms_logs <the --output_path below> --val-dir <tasks.dir>",
             "#   llava_in_the_wild is judged by GPT-4: it needs OPENAI_API_KEY.",
             "set -e",
             'HERE=$(cd "$(dirname "$0")" && pwd)',
             "python - \"$HERE\" <<'PY'", CHECK.rstrip(), "PY"]
    wanted = [t for t in tasks if t in ICONS_TASKS]
    if wanted:
        lines += ["LMMS=$(python -c 'import lmms_eval, os; print(os.path.dirname(lmms_eval.__file__))')",
                  f'mkdir -p "$HERE/{TASKS_DIR}"']
        for task in wanted:
            base, kwargs = ICONS_TASKS[task]
            lines += [f'cat > "$HERE/{TASKS_DIR}/{task}.yaml" <<EOF', f"include: $LMMS/{base}", f"task: {task}",
                      "lmms_eval_specific_kwargs:", "  default:",
                      *[f"    {k}: {v if v in ('true', 'false') else chr(34) + v + chr(34)}" for k, v in kwargs.items()],
                      "EOF"]
    return "\n".join(lines + [cmd]) + "\n"


def write_command(out: Path, tasks: Sequence[str] = LMMS_EVAL_TASKS, num_processes: int = 1,
                  output_path: str | Path | None = None) -> str:
    """Write ``lmms_eval.sh`` into the export (and the command into its info); returns the command."""
    info = read_json(out / INFO)
    cmd = lmms_eval_command(out, output_path or default_output_path(out), tasks, info["dtype"], num_processes)
    atomic_write_text(out / COMMAND, script(cmd, tasks))
    os.chmod(out / COMMAND, 0o755)
    if info.get("lmms_eval") != cmd:
        write_json(out / INFO, dict(info, lmms_eval=cmd))
    return cmd
