"""The converter's output as the pipeline's target tasks (``tasks=llava_benchmarks``).

``python -m icons.data.benchmarks <task> ... --out DIR`` writes ``DIR/<task>.json`` (the validation
records) and ``DIR/<task>.meta.json``. :func:`task_files` finds each configured task's file (a
missing one stops with one line naming it and the command that makes it) and the directory its
relative image paths start from: ``tasks.image_root`` (null = the pool's image root: the
converter's default image paths follow LLaVA's ``playground/data``), or the output directory
itself for images the converter wrote there (MMBench's, whose meta says ``"image_root": "."``).
The records are then validated like pool records (``check.py``); each keeps its id, its ``task``
must be the file's task, and MME's keep their ``subtask``. There are no test splits here: the
real benchmarks are evaluated by lmms-eval.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..llava_json import BadInputError, format_problem, problem

__all__ = ["convert_command", "task_files"]


def convert_command(task: str, out_dir: str | Path) -> str:
    """The command that writes ``out_dir/<task>.json``, with what ``--src`` takes."""
    from . import TASKS

    what = f" (--src: {TASKS[task][1]})" if task in TASKS else ""
    return f"`python -m icons.data.benchmarks {task} --src ... --out {out_dir}`{what}"


def _fail(path: Path, kind: str, message: str, field_: str | None = None) -> BadInputError:
    p = problem(path, None, None, None, field_, kind, message)
    return BadInputError(f"bad input: {format_problem(p)}", [p])


def _image_root(dir_: Path, task: str, default: Path) -> Path:
    """Where ``task``'s relative image paths start: ``image_root`` of its meta file (relative to
    ``dir_``) when the converter wrote the images there, else ``default``."""
    meta = dir_ / f"{task}.meta.json"
    if not meta.is_file():
        return default
    try:
        root = json.loads(meta.read_text(encoding="utf-8")).get("image_root")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise _fail(meta, "invalid_json_file", f"is not the converter's meta JSON ({err}); rebuild it with "
                                               f"{convert_command(task, dir_)}") from None
    return (dir_ / root).resolve() if isinstance(root, str) else default


def task_files(dir_: str | Path, names: list[str], default_root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``({task: DIR/<task>.json}, {task: its image root})`` for every name; a missing file raises
    :class:`BadInputError` (one line: the file, and the converter command that makes it)."""
    dir_ = Path(dir_).expanduser().resolve()
    files, roots = {}, {}
    for task in names:
        path = dir_ / f"{task}.json"
        if not path.is_file():
            raise _fail(path, "missing_file", f"no validation set for task {task!r} (tasks.dir={dir_}); make it "
                                              f"with {convert_command(task, dir_)}; README, Reproduce the paper")
        files[task] = path
        roots[task] = _image_root(dir_, task, default_root)
    return files, roots
