"""The feature store of one checkpoint: pre-allocated ``.npy`` arrays written in place by every rank
(``pool_scores.npy`` N x G, ``pool.npy`` N x d with a projection, the done mask ``pool_done.npy``),
how each set was made (``pool_meta.json``, ``val_meta.json``), and reading it back.

A resumed run refuses to continue a pool store made with another projection, and scoring refuses
to combine sets that disagree (``check_feature_dirs``, ``score_stored``; the rule is
``influence.check_compatible``).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from ..influence import check_compatible, stream_scores
from ..io import ResourceError, human_bytes, read_json, write_json


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock (``flock``) held while the block runs: several processes
    creating or checking the shared pool store one at a time."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_disk_space(out_dir: Path, need: int, what: str = "feature store") -> None:
    """Stop with one line (:class:`ResourceError`) when ``out_dir``'s file system has less than
    ``need`` bytes free (memory-mapped stores are sparse: without this they fail mid-run)."""
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ResourceError(f"not enough disk space for the {what} in {out_dir}: needs {human_bytes(need)} "
                            f"({need} bytes), {human_bytes(free)} ({free} bytes) free")


def open_store(out_dir: Path, n: int, groups: list[str], made: dict, ids: list, feature_dim: int | None,
               dtype: str) -> tuple[np.memmap, np.memmap | None, np.memmap]:
    """(scores, features or None, done mask) of the pool store in ``out_dir``, created by the first
    process to arrive (under a file lock, the mask last so that it marks a whole store) or opened
    to resume (refused when it was made another way)."""
    scores_path, mask_path, fpath = out_dir / "pool_scores.npy", out_dir / "pool_done.npy", out_dir / "pool.npy"
    with file_lock(out_dir / ".pool.lock"):
        mode = "r+" if scores_path.exists() and mask_path.exists() else "w+"
        if mode == "r+":
            if not (out_dir / "pool_meta.json").exists():
                raise ValueError(f"cannot resume {out_dir}: its pool rows have no pool_meta.json (made by an older "
                                 f"version); delete the directory to extract again")
            old = read_json(out_dir / "pool_meta.json")
            check_compatible({f"stored pool features in {out_dir}": old, "this run": made})
            if (old.get("gradient"), old.get("n"), old.get("groups")) != (made["gradient"], n, groups):
                raise ValueError(f"cannot resume {out_dir}: stored pool rows were made with gradient={old.get('gradient')}, "
                                 f"n={old.get('n')}, groups={old.get('groups')}; this run has "
                                 f"gradient={made['gradient']}, n={n}, groups={groups}")
        else:
            item = np.dtype(dtype).itemsize if feature_dim else 0
            check_disk_space(out_dir, n * len(groups) * 4 + n * (feature_dim or 0) * item + n)
            write_json(out_dir / "pool_meta.json", made)
            write_json(out_dir / "pool_ids.json", ids)
        scores = np.lib.format.open_memmap(scores_path, mode=mode, dtype=np.float32, shape=(n, len(groups)))
        feats = None
        if feature_dim:
            feats = np.lib.format.open_memmap(fpath, mode=mode if fpath.exists() else "w+", dtype=np.dtype(dtype),
                                              shape=(n, feature_dim))
        if mode == "w+":
            scores.flush()
            if feats is not None:
                feats.flush()
        done = np.lib.format.open_memmap(mask_path, mode=mode, dtype=bool, shape=(n,))
        if done.dtype != bool or done.shape != (n,):
            raise ValueError(f"{mask_path}: expected a ({n},) bool mask, got {done.shape} {done.dtype}")
    return scores, feats, done


def feature_meta(ckpt_dir: Path, which: str) -> dict:
    """How the ``which`` (``pool`` or ``val``) feature set of a checkpoint directory was made.
    Directories written before per-set metadata existed fall back to ``meta.json`` (there both
    sets came from one run with one projection)."""
    if which not in ("pool", "val"):
        raise ValueError(f"which must be 'pool' or 'val', got {which!r}")
    for name in (f"{which}_meta.json", "meta.json"):
        if (ckpt_dir / name).exists():
            return read_json(ckpt_dir / name)
    raise ValueError(f"{ckpt_dir}: no {which}_meta.json or meta.json: cannot tell how its {which} features were made")


def check_feature_dirs(ckpt_dirs: list[Path]) -> dict:
    """Pool and validation sets of every checkpoint directory, and all directories together,
    must come from the same projection (kind, dim, seed, gradient dim). Returns the signature."""
    metas = {}
    for d in ckpt_dirs:
        for which in ("pool", "val"):
            metas[f"{which} features in {d}"] = feature_meta(d, which)
    return check_compatible(metas)


def score_stored(pool_dir: Path, val_dir: Path, chunk_rows: int = 16384) -> tuple[np.ndarray, list[str], list[str]]:
    """(N x G scores, groups, pool ids): the stored pool features of ``pool_dir`` (``pool.npy``)
    against the validation group means of ``val_dir``, streamed in chunks. Both must come from
    the same projection (checked, as is that every pool row is done)."""
    check_compatible({f"pool features in {pool_dir}": feature_meta(pool_dir, "pool"),
                      f"validation means in {val_dir}": feature_meta(val_dir, "val")})
    if not (pool_dir / "pool.npy").exists():
        raise ValueError(f"{pool_dir}: no stored pool features (pool.npy); the exact mode stores only scores")
    done = np.load(pool_dir / "pool_done.npy")
    if not done.all():
        raise ValueError(f"{pool_dir}: {int((~done).sum())} pool rows have no features yet")
    means = np.load(val_dir / "val_means.npy")
    scores = stream_scores(pool_dir / "pool.npy", means, chunk_rows)
    return scores, read_json(val_dir / "groups.json"), read_json(pool_dir / "pool_ids.json")


def load_group_scores(ckpt_dir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(N x G scores, groups, pool ids) of a finished checkpoint directory."""
    done = np.load(ckpt_dir / "pool_done.npy")
    if not done.all():
        raise ValueError(f"{ckpt_dir}: {int((~done).sum())} pool rows have no features yet")
    return np.load(ckpt_dir / "pool_scores.npy"), read_json(ckpt_dir / "groups.json"), read_json(ckpt_dir / "pool_ids.json")
