"""Small file helpers: every finished file is written atomically (temp file + rename)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """A file object for ``path`` that only appears there, complete and synced, when the block ends
    without an exception (temp file in the same directory, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_json_list(path: str | Path, rows: Iterable[Any]) -> int:
    """A JSON list written row by row (rows may come from a generator: never all in memory),
    atomically like every other file here. Returns the number of rows."""
    n = 0
    with atomic_open(path, "w") as f:
        f.write("[")
        for row in rows:
            f.write(("\n" if n == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
            n += 1
        f.write("\n]\n")
    return n


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def config_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a JSON-able object (keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def save_npy(path: str | Path, array: Any) -> None:
    """``np.save`` (no pickles) written atomically: a reader sees the whole array or no file."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- test hook (crash tests only)
SLOW_STAGE_ENV, SLOW_SECONDS_ENV = "ICONS_TEST_SLOW_STAGE", "ICONS_TEST_SLOW_S"


def slow_stage(stage: str) -> bool:
    """Whether the crash-test hook is on for ``stage``: ``ICONS_TEST_SLOW_STAGE=<stage>`` (one of
    ``warmup``, ``features``, ``forward``, ``select``). Off unless that variable is set; never set it in real
    runs. Used by ``tests/test_crash_resume.py`` to SIGKILL a run inside a stage, at a moment it
    can see from the stage's files (a stage of the smoke run is otherwise over in milliseconds)."""
    return os.environ.get(SLOW_STAGE_ENV) == stage


def slow_point(stage: str) -> None:
    """The hook's pause: with ``ICONS_TEST_SLOW_STAGE=<stage>``, sleep ``ICONS_TEST_SLOW_S`` seconds
    (default 2) at this step boundary of ``stage`` (warmup: after each epoch checkpoint; features:
    and forward: after each batch, whose rows are then committed to the done mask at once; select: after
    ``indices.npy``, before ``ids.json`` and the manifest). Does nothing otherwise."""
    if slow_stage(stage):
        import time

        time.sleep(float(os.environ.get(SLOW_SECONDS_ENV, "2")))


class ResourceError(RuntimeError):
    """Not enough of a machine resource (disk) to go on; ``str(err)`` is one line."""


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
