"""Step 3 of ICONS, the specialist: per-task influence scores from gradient features.

``s_k(z) = mean over z' in val_k of cos(G(z), g(z'))`` equals ``<G(z)/|G(z)|, mean_z' g(z')/|g(z')|>``,
so each task (or sub-task) needs one mean vector and the N x |val| matrix never exists.
Several warmup checkpoints combine as ``sum_c w_c s_c`` with ``w_c`` their normalised average
learning rates (LESS); a task with sub-tasks (the MME analog) takes the max over its sub-tasks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where needed: streamed scoring runs on numpy alone
    import torch

MERGE = "__merge__"


def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


#: the Adam direction's form, part of the features stage's key (a result of another form is not reused)
ADAM_FORM = "less: m1 / sqrt(v1 + eps)"


def adam_precondition(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float,
                      eps: float) -> torch.Tensor:
    """LESS's Adam direction for one step from the checkpoint's (read-only) moments, exactly as
    LESS computes it (``collect_grad_reps.obtain_gradients_with_adam``): ``m1 / sqrt(v1 + eps)``,
    eps inside the root, no bias correction. With most second moments far below eps (a 7B LoRA's
    are), this is not ``m1 / (sqrt(v1) + eps)``: eps then bounds the step instead of vanishing."""
    m1 = beta1 * m + (1 - beta1) * g
    v1 = beta2 * v + (1 - beta2) * g * g
    return m1 / (v1 + eps).sqrt()


def group_of(record: dict) -> str:
    """Validation group of a record: its task, or ``task/subtask`` for tasks with sub-tasks."""
    return f"{record['task']}/{record['subtask']}" if record.get("subtask") else record["task"]


def group_means(normed: torch.Tensor, labels: list[str], groups: list[str]) -> torch.Tensor:
    """(G, d) mean of the normalised validation vectors of each group."""
    import torch

    out = torch.zeros(len(groups), normed.shape[1], dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.float64)
    index = {g: i for i, g in enumerate(groups)}
    for row, lab in zip(normed, labels):
        for g in (lab, MERGE):
            if g in index:
                out[index[g]] += row.double()
                counts[index[g]] += 1
    if (counts == 0).any():
        empty = [g for g, c in zip(groups, counts) if c == 0]
        raise ValueError(f"validation groups without examples: {empty}")
    return (out / counts[:, None]).float()


def combine_checkpoints(per_ckpt: list[np.ndarray], avg_lrs: list[float]) -> np.ndarray:
    w = np.asarray(avg_lrs, dtype=np.float64)
    w = w / w.sum()
    return sum(wc * s.astype(np.float64) for wc, s in zip(w, per_ckpt))


def task_table(group_scores: np.ndarray, groups: list[str], tasks: list[str]) -> np.ndarray:
    """(N, G) group scores -> (N, K) task scores (sub-tasks: max)."""
    cols = []
    for t in tasks:
        idx = [i for i, g in enumerate(groups) if g == t or g.startswith(t + "/")]
        if not idx:
            raise ValueError(f"no validation scores for task {t!r}")
        cols.append(group_scores[:, idx].max(axis=1))
    return np.stack(cols, axis=1)


def direct_scores(pool: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Reference for tests: the N x V cosine matrix, averaged over V."""
    p = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    v = val / np.linalg.norm(val, axis=1, keepdims=True)
    return (p @ v.T).mean(axis=1)


# ---------------------------------------------------------------- feature-set compatibility
def projection_signature(meta: dict) -> dict:
    """What must agree for two feature sets to be combined: the projection's kind, output dim,
    input (gradient) dim, and, for random projections, the seed (and the Kronecker layout)."""
    p = meta.get("projection")
    if not isinstance(p, dict) or "kind" not in p:
        raise ValueError("feature metadata has no 'projection' record")
    sig = {"kind": p["kind"], "dim": p.get("dim"), "grad_dim": meta.get("grad_dim", p.get("in_dim"))}
    if p.get("in_dim") is not None and sig["grad_dim"] != p["in_dim"]:
        raise ValueError(f"feature metadata disagrees with itself: grad_dim {sig['grad_dim']} != projection in_dim {p['in_dim']}")
    if p["kind"] != "none":
        sig["seed"] = p.get("seed")
    if p["kind"] == "kronecker":
        sig["layout"] = p.get("layout_sha1")
    return sig


def _describe(sig: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sig.items())


def check_compatible(metas: dict[str, dict]) -> dict:
    """Refuse (one-line ``ValueError``) to combine feature sets made with different projections.

    ``metas``: label (e.g. ``"pool ckpt-10"``) -> that set's metadata (``{"projection": ...,
    "grad_dim": ...}``). Returns the common signature.
    """
    if not metas:
        raise ValueError("no feature sets to check")
    items = list(metas.items())
    first_label, first = items[0]
    want = projection_signature(first)
    for label, meta in items[1:]:
        got = projection_signature(meta)
        if got != want:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise ValueError(f"refusing to combine features made with different projections ({', '.join(diff)} differ): "
                             f"{first_label} [{_describe(want)}] vs {label} [{_describe(got)}]")
    return want


# ---------------------------------------------------------------- streamed task scores
def npy_layout(path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return shape, dtype, f.tell()


def stream_scores(store_path, means, chunk_rows: int = 16384, out: np.ndarray | None = None) -> np.ndarray:
    """(N, K) float32 scores ``features @ means.T`` of a stored (N, d) ``.npy`` feature set
    (float16 or float32), read ``chunk_rows`` rows at a time.

    Rows are read with plain file reads into two reused buffers (one of the stored dtype, one
    float32), not through a memory map: a memory map's touched pages count as the process's
    resident memory, so scoring a 2 GB store would make the process 2 GB large. Memory is
    ``chunk_rows * d * (itemsize + 4)`` bytes plus the (N, K) result.
    """
    shape, dtype, offset = npy_layout(store_path)
    if len(shape) != 2:
        raise ValueError(f"{store_path}: expected an (N, d) feature array, got shape {shape}")
    n, d = shape
    means = np.ascontiguousarray(np.asarray(means, dtype=np.float32))
    if means.ndim != 2 or means.shape[1] != d:
        raise ValueError(f"{store_path}: features have dim {d}, means have shape {means.shape}")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    chunk_rows = min(chunk_rows, max(n, 1))
    if out is None:
        out = np.empty((n, means.shape[0]), dtype=np.float32)
    elif out.shape != (n, means.shape[0]):
        raise ValueError(f"out has shape {out.shape}, expected {(n, means.shape[0])}")
    raw = np.empty((chunk_rows, d), dtype=dtype)
    f32 = raw if dtype == np.float32 else np.empty((chunk_rows, d), dtype=np.float32)
    mt = means.T.copy()
    with open(store_path, "rb", buffering=0) as f:
        f.seek(offset)
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            view = memoryview(raw[:rows].reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise ValueError(f"{store_path}: file ends at row {start}, header says {n} rows")
                got += k
            if f32 is not raw:
                np.copyto(f32[:rows], raw[:rows])
            np.matmul(f32[:rows], mt, out=out[start:start + rows])
    return out
