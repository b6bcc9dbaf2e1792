"""What a baseline selector computes per example, kept like the gradient features: pre-allocated
``.npy`` arrays (one per column, ``pool_<column>.npy``, N x width) written in place by every rank,
a done mask (``pool_done.npy``, committed only after the rows it marks are flushed) and how the
store was made (``pool_meta.json``), so a killed run resumes where it stopped and a store made
another way is refused rather than mixed.

    store = RowStore.open(out, n=len(pool), columns={"loss": (1, "float32"), "embed": (160, "float32")},
                          made={"model": "base", "key": key})
    store.write(rows, {"loss": ..., "embed": ...}); store.commit()
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..features.store import check_disk_space, file_lock
from ..io import read_json, write_json


class RowStore:
    """Memory-mapped columns of one example set plus its done mask (see the module docstring)."""

    def __init__(self, out_dir: Path, arrays: dict[str, np.memmap], done: np.memmap):
        self.out_dir, self.arrays, self.done = out_dir, arrays, done
        self._pending: list[int] = []

    @classmethod
    def open(cls, out_dir: Path, n: int, columns: dict[str, tuple[int, str]], made: dict,
             prefix: str = "pool") -> "RowStore":
        """Create the store (the first process to arrive, under a file lock; the mask last, so that
        it marks a whole store) or open it to resume; refused when ``made`` differs from the
        stored ``<prefix>_meta.json`` (another model, columns or pool size)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        made = {**made, "n": n, "columns": {k: [int(w), str(d)] for k, (w, d) in columns.items()}}
        meta_path, mask_path = out_dir / f"{prefix}_meta.json", out_dir / f"{prefix}_done.npy"
        with file_lock(out_dir / f".{prefix}.lock"):
            resume = meta_path.exists() and mask_path.exists()
            if resume and read_json(meta_path) != made:
                raise ValueError(f"cannot resume {out_dir}: its {prefix} rows were made as {read_json(meta_path)}, "
                                 f"this run makes {made}; delete the directory to compute them again")
            if not resume:
                check_disk_space(out_dir, n * (1 + sum(w * np.dtype(d).itemsize for w, d in columns.values())),
                                 "selector store")
                write_json(meta_path, made)
            mode = "r+" if resume else "w+"
            arrays = {}
            for name, (width, dtype) in columns.items():
                arrays[name] = np.lib.format.open_memmap(out_dir / f"{prefix}_{name}.npy", mode=mode,
                                                         dtype=np.dtype(dtype), shape=(n, width))
                if not resume:
                    arrays[name].flush()
            done = np.lib.format.open_memmap(mask_path, mode=mode, dtype=bool, shape=(n,))
        return cls(out_dir, arrays, done)

    def write(self, rows: list[int], values: dict[str, np.ndarray]) -> None:
        """Rows' values (marked done at the next :meth:`commit`)."""
        for name, arr in self.arrays.items():
            arr[rows] = values[name].reshape(len(rows), -1)
        self._pending.extend(rows)

    def commit(self) -> None:
        for arr in self.arrays.values():
            arr.flush()
        if self._pending:
            self.done[self._pending] = True
            self.done.flush()
            self._pending.clear()

    @property
    def complete(self) -> bool:
        return bool(np.asarray(self.done).all())


def rows_missing(out_dir: Path, prefix: str = "pool") -> int:
    """How many rows of a store its done mask does not mark."""
    return int((~np.load(out_dir / f"{prefix}_done.npy")).sum())


def load_column(out_dir: Path, name: str, prefix: str = "pool") -> np.ndarray:
    """A finished store's column (N x width; refused while rows are missing)."""
    if missing := rows_missing(out_dir, prefix):
        raise ValueError(f"{out_dir}: {missing} {prefix} rows have no values yet; rerun the stage to resume")
    return np.load(out_dir / f"{prefix}_{name}.npy", mmap_mode="r")
