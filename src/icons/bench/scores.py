"""``python -m icons.bench.scores``: task scores streamed from a stored feature set.

A synthetic store of ``N`` unit-norm feature rows (``--dim`` columns, float16, a ``.npy`` file
that ``np.load(..., mmap_mode='r')`` opens as a memmap) is written to a temporary directory in
chunks by a child process (so its writing does not count here); then
``icons.influence.stream_scores`` reads it back ``--chunk-rows`` rows at a time and scores every
row against ``K`` group means. Reported: rows/s of the scoring pass and this process's peak
resident memory (``ru_maxrss``, which covers the whole process: Python, numpy, the chunk buffers
and the (N, K) result). The scored rows are checked against an in-memory product on a sample.
Note the store was just written, so it is read from the page cache, not from the disk.

Default N = 200,000 (seconds); ``--n 1000000`` is the issue's target size (2 GB store at dim 1024).
Ends with one line ``peak_rss_gib=<z> rows_per_s=<r>``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_store(path: str, n: int, dim: int, dtype: str, chunk_rows: int, seed: int) -> None:
    """The synthetic store, written chunk by chunk into a pre-allocated .npy memmap."""
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk_rows):
        x = rng.standard_normal((min(chunk_rows, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store[s:s + len(x)] = x
        store.flush()
    del store


def _rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    cur = peak
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return cur, peak


def main(argv=None) -> None:
    from ..influence import stream_scores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="stored rows")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=22, help="group means (9 tasks + 13 MME sub-tasks in the paper)")
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp-dir", default=None, help="where the temporary store goes (default: the system's)")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="icons-bench-scores-", dir=a.tmp_dir) as tmp:
        path = str(Path(tmp) / "pool.npy")
        t = time.perf_counter()
        child = mp.get_context("spawn").Process(target=_write_store, args=(path, a.n, a.dim, a.dtype, 65536, a.seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            sys.exit(f"writing the synthetic store failed (exit code {child.exitcode})")
        write_s = time.perf_counter() - t
        rng = np.random.default_rng(a.seed + 1)
        means = rng.standard_normal((a.k, a.dim)).astype(np.float32)
        means /= np.linalg.norm(means, axis=1, keepdims=True) * 4  # a mean of unit vectors is shorter than 1
        rss0, _ = _rss_gib()
        t = time.perf_counter()
        scores = stream_scores(path, means, chunk_rows=a.chunk_rows)
        score_s = time.perf_counter() - t
        rss1, peak = _rss_gib()
        # check: a sample of rows against an in-memory product
        store = np.load(path, mmap_mode="r")
        idx = np.sort(rng.choice(a.n, size=min(a.n, 2000), replace=False))
        want = np.asarray(store[idx], dtype=np.float64) @ means.T.astype(np.float64)
        err = float(np.abs(scores[idx] - want).max())
        del store
        size_gib = Path(path).stat().st_size / 2 ** 30
    if err > 1e-4:
        sys.exit(f"streamed scores disagree with the in-memory product: max abs error {err:.2e}")
    chunk_mib = a.chunk_rows * a.dim * (np.dtype(a.dtype).itemsize + (0 if a.dtype == "float32" else 4)) / 2 ** 20
    print(f"rows={a.n} dim={a.dim} k={a.k} dtype={a.dtype} store={size_gib:.2f} GiB chunk_rows={a.chunk_rows} "
          f"(buffers {chunk_mib:.0f} MiB) result={scores.nbytes / 2 ** 20:.0f} MiB")
    print(f"  write (child process) {write_s:.1f}s; scoring {score_s:.2f}s; max abs error vs in-memory {err:.1e}")
    print(f"  rss before scoring {rss0:.3f} GiB, after {rss1:.3f} GiB, peak {peak:.3f} GiB")
    print(f"peak_rss_gib={peak:.3f} rows_per_s={a.n / score_s:.0f}")


if __name__ == "__main__":
    main()
