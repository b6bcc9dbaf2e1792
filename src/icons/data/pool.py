"""The pool as a lazy sequence: records of a LLaVA ``.json`` / ``.jsonl`` file read by position.

A several-GB pool (Cambrian-7M's JSONL) never fits in memory as Python objects. One pass over the
file records where each record lies (:func:`build_index`: start byte, end byte, line), saved as an
``.npy`` next to the run and reused while the file keeps its path, size and modification time
(:func:`index_file`). :class:`LazyPool` then reads record ``i`` with one ``pread`` and one
``json.loads``; it has ``len``, indexing and iteration, so the stages use it in place of a list.

    index = index_file(path, run_dir / "data" / "index")
    pool = LazyPool(path, index, positions=None, ids=None)   # positions: the kept records (skip policy)
    pool[3], len(pool), pool.ids, pool.file_position(3), pool.raw(3)

A pool row is its index here; its identity in the source file is its position there
(``file_position``), never its id: real files repeat ids (LLaVA-665K's COCO-derived records carry
their image's id), and an id is only a label that travels with the row.
"""
from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import config_hash, read_json, save_npy, write_json
from .llava_json import (BadInputError, PoolFileError, file_signature, format_problem, is_jsonl, iter_spans,
                         parse_line, problem, with_image_token)

__all__ = ["LazyPool", "build_index", "index_file"]


def build_index(path: str | Path) -> np.ndarray:
    """``(N, 3)`` int64: start byte, end byte and 1-based line of every record, in file order (one
    pass; the same records, in the same order, as :func:`~icons.data.llava_json.iter_records`)."""
    flat = array("q")
    for start, end, line, _ in iter_spans(path):
        flat.extend((start, end, line))
    return np.frombuffer(flat, dtype=np.int64).reshape(-1, 3).copy()


def index_file(path: str | Path, cache_dir: str | Path) -> Path:
    """The cached index of ``path`` in ``cache_dir``, built when missing or when the file's size or
    modification time differ from those it was built from (then rebuilt in place)."""
    path = Path(path)
    sig = file_signature(path)
    out = Path(cache_dir) / f"{path.name}.{config_hash(sig['path'])}.index.npy"
    sidecar = out.with_suffix(".json")
    if out.exists() and sidecar.exists() and read_json(sidecar) == sig:
        return out
    index = build_index(path)
    if file_signature(path) != sig:
        raise PoolFileError(format_problem(problem(path, None, None, None, None, "invalid_json_file",
                                                   "the file changed while it was being indexed; try again")))
    save_npy(out, index)
    write_json(sidecar, sig)  # last: a sidecar names a whole index
    return out


class LazyPool(Sequence):
    """Records of one LLaVA file, read by position through its offset index (see the module doc).

    ``positions``: the file positions of the pool's records (an ``.npy`` path or an array; None =
    every record), so ``pool[i]`` is the record at file position ``positions[i]``. ``ids``: the
    records' ids in pool order, if known (else read once, on first use). ``signature``: the
    :func:`~icons.data.llava_json.file_signature` the index was made for; a file changed since
    is refused. Records come back with LLaVA's ``<image>`` repair applied, as validation saw them.
    Picklable (worker processes reopen the file)."""

    def __init__(self, path: str | Path, index: str | Path, positions: str | Path | np.ndarray | None = None,
                 ids: list | None = None, signature: dict | None = None):
        self.path, self.index_path = Path(path), Path(index)
        self._positions_src = positions
        self._ids = ids
        if signature is not None and file_signature(self.path) != signature:
            raise PoolFileError(format_problem(problem(
                self.path, None, None, None, None, "missing_file",
                "changed (or is gone) since the data stage indexed it; run the data stage again")))
        self._jsonl = is_jsonl(self.path)
        self._open()

    def _open(self) -> None:
        self._index = np.load(self.index_path, mmap_mode="r")
        src = self._positions_src
        self._keep = np.load(src, mmap_mode="r") if isinstance(src, (str, Path)) else src
        self._fd, self._pid = None, None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_index", "_keep", "_fd", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self._keep) if self._keep is not None else len(self._index)

    def __getitem__(self, i: int | slice) -> dict | list[dict]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pool index {i} out of range (pool of {n})")
        return self._read(self.file_position(int(i) % n))

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # one descriptor per process (fork-safe)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, pos: int, repair: bool = True) -> dict:
        start, end, line = (int(x) for x in self._index[pos])
        raw = os.pread(self._handle(), end - start, start)
        if self._jsonl:
            rec, prob = parse_line(self.path, pos, line, raw)
        else:
            rec, prob = _parse_element(self.path, pos, raw)
        if prob is None and not isinstance(rec, dict):
            prob = problem(self.path, pos, line if self._jsonl else None, None, None, "not_object",
                           f"record is a JSON {type(rec).__name__}, expected an object")
        if prob is not None:  # validated records never get here; an unchecked or edited file may
            raise BadInputError(f"bad input: {format_problem(prob)}", [prob])
        return with_image_token(rec) if repair and isinstance(rec.get("conversations"), list) else rec

    @property
    def ids(self) -> list:
        """Every record's id, in pool order (read once when not given)."""
        if self._ids is None:
            self._ids = [r.get("id") for r in self]
        return self._ids

    def file_position(self, i: int) -> int:
        """The position in the source file of pool row ``i`` (the row itself without a skip policy)."""
        return int(self._keep[i]) if self._keep is not None else int(i)

    def file_positions(self):
        """Every row's position in the source file, in pool order."""
        return np.asarray(self._keep, dtype=np.int64) if self._keep is not None else np.arange(len(self), dtype=np.int64)

    def raw(self, i: int) -> dict:
        """Pool row ``i`` exactly as the file has it (no ``<image>`` repair): what a subset file holds."""
        return self._read(self.file_position(i), repair=False)


def _parse_element(path: Path, pos: int, raw: bytes) -> tuple[Any, dict | None]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, problem(path, pos, None, None, None, "invalid_json", f"cannot be read again: {err}")
