"""Where a config's pool and task files are, and what a data result depends on.

:func:`data_sources` names the pool file and every task's ``val`` / ``test`` file of a config (the
mini-LLaVA benchmark is generated once into the cache when the pool or the tasks come from it:
data work, never model work); :func:`data_key` is what the check and data stages' keys hold
besides the config: the user's files (an edited pool or validation file is read again), the
model's length limit and, for the miniature benchmark, the generator's version.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from .llava_json import BadInputError, file_signature, problem, summary_error

__all__ = ["DataSources", "data_key", "data_sources", "mini_llava_benchmark", "model_key", "task_name_problems"]


def mini_llava_benchmark(cfg: DictConfig):
    """The generated mini-LLaVA benchmark of this config (its pool and/or its target tasks),
    built once into the cache."""
    from .mini_llava import BenchmarkSpec, build

    spec = BenchmarkSpec(pool_size=cfg.data.pool_size, n_val=cfg.tasks.n_val, n_test=cfg.tasks.n_test,
                         seed=cfg.data.seed, p_duplicate=cfg.data.p_duplicate,
                         p_label_noise=cfg.data.p_label_noise, p_garbage=cfg.data.p_garbage,
                         tasks=tuple(cfg.tasks.names),
                         family_shares=(tuple(sorted(cfg.data.family_shares.items()))
                                        if cfg.data.get("family_shares") else None))
    return build(spec, Path(cfg.cache_dir))


@dataclass
class DataSources:
    """Where the pool and the task files of a config are (before the data stage copies anything).
    ``test`` is empty for tasks without test splits (``tasks.kind=llava_benchmarks``);
    ``task_roots`` overrides ``task_image_root`` per task."""

    kind: str
    pool: Path
    image_root: Path
    task_image_root: Path | None
    val: dict[str, Path]
    test: dict[str, Path]
    task_roots: dict[str, Path] = field(default_factory=dict)

    def task_root(self, task: str) -> Path | None:
        return self.task_roots.get(task, self.task_image_root)


def task_name_problems(names: list[str], known: tuple[str, ...] | None = None) -> list[dict]:
    """Task names that cannot all live side by side: equal up to case (``tasks/<name>/`` on a
    case-insensitive file system), not a plain directory name, or (given ``known``) unknown."""
    probs: list[dict] = []
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        where = f"tasks.names[{i}]"
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            probs.append(problem("config", None, None, None, where, "task_name_collision",
                                 f"task name {name!r} is not a plain directory name"))
            continue
        other = seen.setdefault(name.casefold(), name)
        if other != name or names.index(name) != i:
            probs.append(problem("config", None, None, None, where, "task_name_collision",
                                 f"task name {name!r} collides with {other!r} (task directories would be shared)"))
        elif known is not None and name not in known:
            probs.append(problem("config", None, None, None, where, "unknown_task",
                                 f"unknown task {name!r}; the tasks group provides: {', '.join(known)}"))
    return probs


def data_sources(cfg: DictConfig) -> DataSources:
    """The pool file and the task files of ``cfg`` (the mini-LLaVA benchmark is generated once into
    the cache when the pool or the tasks come from it: data work, never model work). Raises
    :class:`BadInputError` for bad task names or a missing benchmark validation file."""
    from .mini_llava import TASK_NAMES

    names = list(cfg.tasks.names)
    real_tasks = cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks"
    bad = task_name_problems(names, None if real_tasks else tuple(TASK_NAMES))
    if bad:
        raise BadInputError(summary_error(bad), bad)
    bench = None
    if cfg.data.kind == "mini_llava" or not real_tasks:
        bench = mini_llava_benchmark(cfg)
    if cfg.data.kind == "llava_json":
        pool = Path(cfg.data.path).expanduser().resolve()
        root = Path(cfg.data.image_root).expanduser().resolve() if cfg.data.image_root else pool.parent
    else:
        pool, root = bench.pool_path, bench.image_root
    if real_tasks:
        return _benchmark_sources(cfg, pool, root, names)
    val = {t: bench.task_path(t, "val") for t in names}
    test = {t: bench.task_path(t, "test") for t in names}
    return DataSources(cfg.data.kind, pool, root, bench.image_root, val, test)


def _benchmark_sources(cfg: DictConfig, pool: Path, root: Path, names: list[str]) -> DataSources:
    """Validation files written by ``python -m icons.data.benchmarks`` (no test splits)."""
    from .benchmarks.sets import task_files

    t = cfg.tasks
    task_root = Path(t.image_root).expanduser().resolve() if t.get("image_root") else root
    val, roots = task_files(t.dir, names, task_root)
    return DataSources(cfg.data.kind, pool, root, task_root, val, {}, roots)


def model_key(cfg: DictConfig) -> dict:
    # model.path, not the resolved tokenizer directory: that one moves from the shipped asset to
    # the cache once the base stage has pretrained a new recipe, which must not redo the data stage
    m = cfg.model
    return {"max_length": m.max_length, "image_size": m.image_size, "patch_size": m.patch_size,
            "path": m.path, **{k: m.get(k) for k in ("template", "llm_path", "vision_path") if m.get(k)}}


def data_key(cfg: DictConfig) -> dict:
    """What a data result depends on besides the config: the user's files (an edited pool or
    validation file is read again), the model's length limit (records are checked against it) and,
    for the miniature benchmark, the generator's version."""
    key: dict = {}
    if cfg.data.kind == "llava_json":
        key["source"] = file_signature(Path(cfg.data.path).expanduser())
    if cfg.tasks.get("kind", "mini_llava") == "llava_benchmarks":
        from .benchmarks.sets import task_files

        t = cfg.tasks
        val, _ = task_files(t.dir, list(t.names), Path("."))
        key["tasks"] = [file_signature(p) for p in val.values()]
        key["meta"] = [file_signature(p.with_suffix(".meta.json")) for p in val.values()]
    if key:
        key["model"] = model_key(cfg)
    if cfg.data.kind == "mini_llava":  # the generated benchmark changes with the generator's code
        from .mini_llava.build import GENERATOR_VERSION

        key["generator"] = GENERATOR_VERSION
    return key
