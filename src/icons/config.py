"""Structured configs for icons: types, defaults, ranges and one-line errors.

The dataclasses below are the schema of every Hydra config under ``conf/``.
Importing this module registers them in Hydra's ConfigStore:

* ``base_config``                      -> :class:`RootConfig` (first entry of ``config.yaml``)
* ``model/schema_model``               -> :class:`ModelConfig`
* ``data/schema_data``                 -> :class:`DataConfig`
* ``tasks/schema_tasks``               -> :class:`TasksConfig`
* ``trainer/schema_trainer``           -> :class:`TrainerConfig`
* ``logger/schema_logger``             -> :class:`LoggerConfig`

OmegaConf checks types (``train.epochs=abc`` fails when the config is composed);
ranges and choices are checked in each dataclass's ``__post_init__``, which
runs when :func:`validate` calls ``OmegaConf.to_object``. :func:`validate`
also rejects keys that are not in the schema (``+data.pool_sise=5`` is
otherwise accepted silently by Hydra) and turns every failure into a
:class:`ConfigError` whose message is one line naming the full dotted key::

    config error: selection.ratio=1.5 must be in (0, 1]
    config error: unknown key 'data.pool_sise'

Choices are plain strings (not Enums) so that the values stay ``str`` in both
the DictConfig and the validated dataclass; the allowed values are exported as
the ``*_CHOICES`` tuples below.
"""

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CONFIG_MODULE",
    "CONFIG_NAME",
    "CONFIG_PATH",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "ConsensusConfig",
    "ProjectionConfig",
    "GradientConfig",
    "WarmupConfig",
    "FieldError",
    "accumulation",
    "GROUP_SCHEMAS",
    "KNOWN_STAGES",
    "LMMS_EVAL_TASKS",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "PretrainConfig",
    "RootConfig",
    "SelectionConfig",
    "TASKS_KIND_CHOICES",
    "TasksConfig",
    "TrainConfig",
    "TrainerConfig",
    "conf_dir",
    "register_configs",
    "validate",
]

# --------------------------------------------------------------------------- #
# Where the YAML configs live
# --------------------------------------------------------------------------- #

#: The package that holds the YAML configs once installed (the top-level
#: ``conf/`` directory of the repository is shipped as ``icons.conf``).
CONFIG_MODULE = "icons.conf"
#: Name of the primary config (``conf/config.yaml``).
CONFIG_NAME = "config"

_SRC_DIR = Path(__file__).resolve().parents[1]
#: ``<repo>/conf`` when running from a checkout (``<repo>/src/icons``), else None.
_REPO_CONF: Optional[Path] = _SRC_DIR.parent / "conf" if _SRC_DIR.name == "src" else None


def _config_path() -> str:
    """``config_path`` for ``@hydra.main`` that works in every layout.

    ``pkg://icons.conf`` when ``icons.conf`` is importable (editable and
    non-editable installs); otherwise (a bare checkout on ``PYTHONPATH=src``)
    the absolute path of the repository's ``conf/``.
    """
    try:
        if importlib.util.find_spec(CONFIG_MODULE) is not None:
            return f"pkg://{CONFIG_MODULE}"
    except (ImportError, ValueError):  # pragma: no cover - defensive
        pass
    return str(_REPO_CONF)  # pragma: no cover - bare checkout only


#: Pass this as ``@hydra.main(version_base="1.3", config_path=CONFIG_PATH,
#: config_name=CONFIG_NAME)``.
CONFIG_PATH = _config_path()


def conf_dir() -> Path:
    """Absolute directory of the YAML configs (for ``initialize_config_dir``)."""
    if _REPO_CONF is not None and (_REPO_CONF / f"{CONFIG_NAME}.yaml").is_file():
        return _REPO_CONF
    import importlib.resources

    return Path(str(importlib.resources.files(CONFIG_MODULE)))


# --------------------------------------------------------------------------- #
# Errors and check helpers
# --------------------------------------------------------------------------- #


class ConfigError(ValueError):
    """A bad config. ``str(err)`` is one line: ``config error: <key>=<value> <reason>``."""


class FieldError(ValueError):
    """Raised by ``__post_init__``; :func:`validate` adds the dotted prefix.

    ``key`` is the field name relative to the dataclass that raised (or a
    tuple of names for a check over several fields). ``reason`` may contain
    ``{prefix}`` to name other fields of the same node.
    """

    def __init__(self, key: str | tuple[str, ...], value: Any = None, reason: str | None = None):
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(self.render(""))

    def render(self, prefix: str) -> str:
        if self.reason is None:  # re-raised by OmegaConf with a single message argument
            return str(self.key)
        keys = (self.key,) if isinstance(self.key, str) else self.key
        name = "+".join(f"{prefix}{k}" for k in keys)
        reason = self.reason.replace("{prefix}", prefix)
        return f"config error: {name}={_fmt(self.value)} {reason}"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("\n", "\\n")


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"must be {'>' if lo_open else '>='} {_bound(lo)}"
    assert hi is not None
    return f"must be {'<' if hi_open else '<='} {_bound(hi)}"


def _unresolved(value: Any) -> bool:
    """True for an interpolation string such as ``${oc.env:X}``.

    Hydra's ConfigStore builds every schema from its defaults without resolving
    them; the checks run again on resolved values in :func:`validate`.
    """
    return isinstance(value, str) and "${" in value


def _numbers(obj: Any, *names: str) -> bool:
    """True when every named field holds a (resolved) number."""
    return all(
        isinstance(getattr(obj, n), (int, float)) and not isinstance(getattr(obj, n), bool)
        for n in names
    )


def _check_range(
    obj: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    value = getattr(obj, name)
    if _unresolved(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, value, "must be a number")
    ok = not (isinstance(value, float) and math.isnan(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise FieldError(name, value, _interval(lo, hi, lo_open, hi_open))


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        _check_range(obj, name, 0, None, lo_open=True)


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        _check_range(obj, name, 0, None)


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if _unresolved(value):
        return
    if value not in choices:
        raise FieldError(name, value, f"must be one of {', '.join(choices)}")


def _check_nonempty_str(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, str) or not value.strip():
            raise FieldError(name, value, "must be a non-empty string")


def _check_str_list(obj: Any, name: str, *, nonempty: bool = True, unique: bool = True) -> None:
    values = list(getattr(obj, name))
    if nonempty and not values:
        raise FieldError(name, values, "must not be empty")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise FieldError(name, values, f"contains an empty name {_fmt(v)!r}")
    if unique:
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise FieldError(name, values, f"lists {v!r} twice")
            seen.add(v)


# --------------------------------------------------------------------------- #
# Choices
# --------------------------------------------------------------------------- #

#: Pipeline stages, in the order ``run.py`` may execute them.
KNOWN_STAGES: tuple[str, ...] = (
    "check",
    "data",
    "base",
    "warmup",
    "features",
    "scores",
    "select",
    "subset",
    "train",
    "export",
    "eval",
    "report",
)
MODEL_KIND_CHOICES = ("tiny_llava", "hf_llava", "llava_1_5")
#: conversation template + image preprocessing (tiny: models/tiny_llava.py; vicuna_v1: LLaVA-1.5's,
#: models/llava15.py)
TEMPLATE_CHOICES = ("tiny", "vicuna_v1")
MODEL_DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DATA_KIND_CHOICES = ("mini_llava", "llava_json")
#: mini_llava: the generated benchmark's tasks (val + test); llava_benchmarks: validation sets built
#: from the real benchmarks' files by ``python -m icons.data.benchmarks`` (no test splits: lmms-eval)
TASKS_KIND_CHOICES = ("mini_llava", "llava_benchmarks")
#: stages that need the tasks' test splits (evaluation and the report of its scores)
EVAL_STAGES = ("eval", "report")
ON_BAD_RECORD_CHOICES = ("error", "skip")
ACCELERATOR_CHOICES = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
#: Lightning strategies icons runs on: one device, DDP (find_unused: full-mode training leaves the
#: projector without a gradient on a text-only micro-batch) and FSDP (GPU only, full state dicts).
#: DeepSpeed is not offered: it is not installed, and Lightning needs the package for it.
STRATEGY_CHOICES = ("auto", "ddp", "ddp_find_unused_parameters_true", "fsdp")
PRECISION_CHOICES = (
    "64-true",
    "32-true",
    "16-true",
    "bf16-true",
    "16-mixed",
    "bf16-mixed",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
)
LOGGER_KIND_CHOICES = ("wandb", "none")
LOGGER_MODE_CHOICES = ("online", "offline", "disabled")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
TRAIN_MODE_CHOICES = ("full", "lora")
LOSS_CHOICES = ("example_mean", "token_mean")
WARMUP_CHECKPOINT_CHOICES = ("last", "all")
GRADIENT_CHOICES = ("adam", "sgd")
PROJECTION_CHOICES = ("none", "rademacher", "kronecker")
FEATURE_DTYPE_CHOICES = ("float32", "float16")
CONSENSUS_CHOICES = ("vote", "mean", "max", "rank", "norm", "merge")
TIE_BREAK_CHOICES = ("mean_rank", "index", "random")
SELECTOR_CHOICES = ("full", "random", "icons")

DEFAULT_TASKS: tuple[str, ...] = (
    "vqav2",
    "gqa",
    "vizwiz",
    "sqa",
    "textvqa",
    "pope",
    "mme",
    "mmbench_en",
    "mmbench_cn",
    "llavaw",
)

#: lmms-eval's task names for the paper's ten benchmarks, in DEFAULT_TASKS's order. Local-scoring
#: splits: VQAv2 val, VizWiz val and MMBench dev (the test splits are scored by submission servers);
#: llava_in_the_wild is judged by GPT-4.
LMMS_EVAL_TASKS: tuple[str, ...] = (
    "vqav2_val",
    "gqa",
    "vizwiz_vqa_val",
    "scienceqa_img",
    "textvqa_val",
    "pope",
    "mme",
    "mmbench_en_dev",
    "mmbench_cn_dev",
    "llava_in_the_wild",
)


# --------------------------------------------------------------------------- #
# Schema
# --------------------------------------------------------------------------- #


@dataclass
class LoraConfig:
    """LoRA adapter on the language model (used by warmup/features and ``train.mode=lora``)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    #: regex over module names (peft ``target_modules`` as a string = full match)
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        _check_range(self, "dropout", 0.0, 1.0, hi_open=True)
        _check_nonempty_str(self, "target_modules")


PHASE_KINDS = ("two_hop", "stream")


@dataclass
class PhaseConfig:
    """One continuation phase of the tiny base, run after the from-scratch pretraining.

    ``two_hop``: text-only two-hop choice (``pretraining.two_hop_stream``), a plain AdamW loop;
    ``stream``: the mixed stage-1 stream of version ``stream`` (images and text)."""

    kind: str = "stream"
    examples: int = 192000
    lr: float = 1e-3
    seed: int = 0
    #: kind=stream: the stage-1 stream version
    stream: int = 7

    def __post_init__(self) -> None:
        _check_choice(self, "kind", PHASE_KINDS)
        _positive(self, "examples", "lr")
        _non_negative(self, "seed", "stream")


def shipped_phases() -> list[PhaseConfig]:
    """The shipped base's continuation (README, The bar): 20k text-only two-hop steps make the LM
    compose look-up and letter; 2 x 6000 steps of stream v7 give the images back and carry the
    choice to captions; 4000 steps of stream v8 add verify questions (MME's yes/no); 4000 steps of
    stream v9 add multiple choice in generic letter formats; 4000 steps each of streams v10, v11 and
    v12 put the image in front of text questions, then ask choices about the image alone."""
    return [PhaseConfig("two_hop", 640000, 1e-3, 0), PhaseConfig("stream", 192000, 1e-3, 7, 7),
            PhaseConfig("stream", 192000, 1e-3, 8, 7), PhaseConfig("stream", 128000, 1e-3, 9, 8),
            PhaseConfig("stream", 128000, 1e-3, 11, 9), PhaseConfig("stream", 128000, 1e-3, 12, 10),
            PhaseConfig("stream", 128000, 1e-3, 13, 11), PhaseConfig("stream", 128000, 1e-3, 14, 12)]


@dataclass
class PretrainConfig:
    """Stage-1 pretraining of the tiny base model (projector + LM on captions/text QA)."""

    examples: int = 288000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    #: share of text-only examples (context QA, lettered choices, copying, trivia)
    text_qa_fraction: float = 0.5
    #: token_mean: captions carry the visual signal token by token (example_mean starved shape
    #: recognition: 26% vs 100% per caption shape word, measured on bases v2 vs v1)
    loss: str = "token_mean"
    #: text-only examples before the mixed stream (a language-model phase, like Vicuna's pretraining)
    lm_examples: int = 96000
    #: continuation phases after the from-scratch pretraining, in order ([] = none)
    phases: List[PhaseConfig] = field(default_factory=shipped_phases)

    def __post_init__(self) -> None:
        _check_choice(self, "loss", LOSS_CHOICES)
        _positive(self, "examples", "batch_size", "lr")
        _non_negative(self, "seed", "lm_examples")
        _check_range(self, "text_qa_fraction", 0.0, 1.0)


def vicuna_template(model_cfg: Any) -> bool:
    """The model speaks LLaVA-1.5's vicuna_v1 prompt (kinds llava_1_5 and hf_llava); else the
    tiny model's own."""
    return model_cfg.get("template", "tiny") == "vicuna_v1"


@dataclass
class ModelConfig:
    """Group ``model``: which vision-language model and how it is built."""

    name: str = "tiny_llava"
    #: tiny_llava (built here) | hf_llava (an HF LLaVA checkpoint dir, ``path``) | llava_1_5 (assembled
    #: from ``llm_path`` + ``vision_path`` + ``projector_path``, models/llava15.py)
    kind: str = "tiny_llava"
    #: checkpoint dir; null = the packaged/cached tiny base model
    path: Optional[str] = None
    #: kind=llava_1_5: the LLM dir (Vicuna-v1.5, HF format, with its tokenizer)
    llm_path: Optional[str] = None
    #: kind=llava_1_5: the CLIP vision tower dir (HF CLIPVisionModel or CLIPModel format)
    vision_path: Optional[str] = None
    #: kind=llava_1_5: LLaVA's stage-1 mm_projector.bin
    projector_path: Optional[str] = None
    #: weights' dtype when loading kinds llava_1_5 / hf_llava+vicuna_v1 (the tiny model is float32)
    dtype: str = "float32"
    #: tiny (the tiny model's) | vicuna_v1 (LLaVA-1.5's prompt, pad-to-square images)
    template: str = "tiny"
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 2
    text_hidden: int = 160
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = 160
    lora: LoraConfig = field(default_factory=LoraConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        _check_nonempty_str(self, "name")
        _check_choice(self, "kind", MODEL_KIND_CHOICES)
        if self.kind == "hf_llava" and not self.path:
            raise FieldError("path", self.path, "must be set when {prefix}kind=hf_llava")
        if self.kind == "llava_1_5":
            for name in ("llm_path", "vision_path", "projector_path"):
                if not getattr(self, name):
                    raise FieldError(name, getattr(self, name), "must be set when {prefix}kind=llava_1_5")
        _check_choice(self, "dtype", MODEL_DTYPE_CHOICES)
        _check_choice(self, "template", TEMPLATE_CHOICES)
        if self.kind in ("tiny_llava", "llava_1_5") and not _unresolved(self.template):
            want = "tiny" if self.kind == "tiny_llava" else "vicuna_v1"
            if self.template != want:
                raise FieldError("template", self.template, f"must be {want} when {{prefix}}kind={self.kind}")
        _positive(
            self,
            "image_size",
            "patch_size",
            "vision_hidden",
            "vision_layers",
            "text_hidden",
            "text_layers",
            "text_heads",
            "max_length",
        )
        if _numbers(self, "image_size", "patch_size") and self.image_size % self.patch_size:
            raise FieldError(
                "image_size",
                self.image_size,
                f"must be a multiple of {{prefix}}patch_size={self.patch_size}",
            )
        if _numbers(self, "text_hidden", "text_heads") and self.text_hidden % self.text_heads:
            raise FieldError(
                "text_hidden",
                self.text_hidden,
                f"must be a multiple of {{prefix}}text_heads={self.text_heads}",
            )


@dataclass
class DataConfig:
    """Group ``data``: the candidate pool (generated mini-LLaVA or a LLaVA JSON file)."""

    name: str = "mini_llava"
    kind: str = "mini_llava"
    seed: int = 0
    pool_size: int = 12000
    p_duplicate: float = 0.15
    p_label_noise: float = 0.10
    p_garbage: float = 0.03
    #: LLaVA JSON/JSONL file (kind=llava_json)
    path: Optional[str] = None
    #: directory the records' ``image`` paths are relative to
    image_root: Optional[str] = None
    on_bad_record: str = "error"
    #: mini_llava: family weights replacing the default pool's make-up, e.g. {mc: 0.6, science: 0.4};
    #: null = the default (families.FAMILY_SHARES). Typed Any: a typed dict node is closed to new
    #: keys, and OmegaConf cannot merge a dict into a None Dict node; checked below instead.
    family_shares: Any = None

    def __post_init__(self) -> None:
        _check_nonempty_str(self, "name")
        if self.family_shares is not None:
            from .data.mini_llava.families import FAMILY_SHARES

            if self.kind != "mini_llava":
                raise FieldError("family_shares", self.family_shares, "applies to {prefix}kind=mini_llava only")
            if not isinstance(self.family_shares, dict):
                raise FieldError("family_shares", self.family_shares, "must be a mapping family -> weight")
            for fam, w in self.family_shares.items():
                if fam not in FAMILY_SHARES:
                    raise FieldError("family_shares", fam, f"is not a family; known: {sorted(FAMILY_SHARES)}")
                if not isinstance(w, (int, float)) or w < 0:
                    raise FieldError("family_shares", f"{fam}: {w}", "must be a number >= 0")
            if not sum(self.family_shares.values()) > 0:
                raise FieldError("family_shares", dict(self.family_shares), "must give some family a weight > 0")
        _check_choice(self, "kind", DATA_KIND_CHOICES)
        if self.kind == "llava_json" and not self.path:
            raise FieldError("path", self.path, "must be set when {prefix}kind=llava_json")
        _non_negative(self, "seed")
        _positive(self, "pool_size")
        names = ("p_duplicate", "p_label_noise", "p_garbage")
        for name in names:
            _check_range(self, name, 0.0, 1.0, hi_open=True)
        total = sum(getattr(self, n) for n in names) if _numbers(self, *names) else 0.0
        if not total < 1.0:
            raise FieldError(names, round(total, 12), "must be < 1")
        _check_choice(self, "on_bad_record", ON_BAD_RECORD_CHOICES)


@dataclass
class TasksConfig:
    """Group ``tasks``: the target tasks, their validation (selection) and test (eval) splits."""

    name: str = "mini_llava"
    kind: str = "mini_llava"
    names: List[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    #: kind=mini_llava: items generated per task for the val / test split, and their seed
    n_val: int = 48
    n_test: int = 300
    seed: int = 0
    #: kind=llava_benchmarks: the converter's --out directory (``<task>.json`` per task)
    dir: Optional[str] = None
    #: kind=llava_benchmarks: where the records' relative image paths start; null = data.image_root
    image_root: Optional[str] = None

    def __post_init__(self) -> None:
        _check_nonempty_str(self, "name")
        _check_choice(self, "kind", TASKS_KIND_CHOICES)
        _check_str_list(self, "names")
        _positive(self, "n_val", "n_test")
        _non_negative(self, "seed")
        if self.kind == "llava_benchmarks" and not self.dir:
            raise FieldError("dir", self.dir, "must be set when {prefix}kind=llava_benchmarks (the directory "
                                              "`python -m icons.data.benchmarks ... --out DIR` wrote)")


@dataclass
class TrainerConfig:
    """Group ``trainer``: Lightning ``Trainer`` hardware settings."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    #: torch.set_num_threads; 0 = torch default
    threads: int = 2
    #: examples per device per forward; null = global batch / world size (no accumulation). The
    #: global batch (train.batch_size, warmup.batch_size) = micro_batch_size x world size x accumulation
    micro_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice(self, "accelerator", ACCELERATOR_CHOICES)
        _positive(self, "devices", "num_nodes")
        _check_choice(self, "strategy", STRATEGY_CHOICES)
        if self.strategy == "fsdp" and self.accelerator not in ("gpu", "cuda") and not _unresolved(self.accelerator):
            raise FieldError("strategy", self.strategy, f"needs a GPU ({{prefix}}accelerator={self.accelerator})")
        _check_choice(self, "precision", PRECISION_CHOICES)
        _non_negative(self, "num_workers", "threads")
        if self.micro_batch_size is not None:
            _positive(self, "micro_batch_size")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def accumulation(global_batch: int, world_size: int, micro_batch: Optional[int] = None) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for a global batch: global = micro x world x accumulation.

    ``micro_batch`` None: global / world, no accumulation. Raises ValueError (the reason, to follow
    the global batch's key and value) when the numbers do not divide."""
    if micro_batch is None:
        if global_batch % world_size:
            raise ValueError(f"must be a multiple of the world size {world_size} "
                             f"(trainer.devices x trainer.num_nodes), or set trainer.micro_batch_size")
        return global_batch // world_size, 1
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"must be a multiple of trainer.micro_batch_size x world size = {micro_batch} x "
                         f"{world_size} = {per_step} (world size = trainer.devices x trainer.num_nodes)")
    return micro_batch, global_batch // per_step


@dataclass
class LoggerConfig:
    """Group ``logger``: Weights & Biases (offline by default) or nothing."""

    kind: str = "wandb"
    project: str = "icons"
    mode: str = "${oc.env:WANDB_MODE,offline}"
    #: W&B group; null = experiment_name
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    #: W&B directory; null = the run directory
    dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice(self, "kind", LOGGER_KIND_CHOICES)
        _check_nonempty_str(self, "project")
        _check_choice(self, "mode", LOGGER_MODE_CHOICES)
        _check_str_list(self, "tags", nonempty=False)


@dataclass
class TrainConfig:
    """Root key ``train``: fine-tuning on a (selected) subset."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    #: full = projector + LM trained, vision frozen; lora = peft LoRA on the LM
    mode: str = "full"
    grad_clip: float = 1.0
    log_every: int = 50
    #: example_mean: mean over each example's own answer tokens, then over the batch (every
    #: example weighs the same); token_mean: HF's default (long answers dominate)
    loss: str = "example_mean"
    #: learning rate of the multimodal projector. mode=lora: null keeps it frozen (LoRA weights
    #: only); a number trains it beside the LoRA weights, as LLaVA-1.5's LoRA recipe does
    #: (--mm_projector_lr 2e-5). mode=full: null = ``lr``.
    projector_lr: Optional[float] = None

    def __post_init__(self) -> None:
        _check_choice(self, "loss", LOSS_CHOICES)
        _positive(self, "epochs", "batch_size", "lr", "log_every")
        if self.projector_lr is not None:
            _positive(self, "projector_lr")
        _non_negative(self, "weight_decay", "grad_clip")
        _check_range(self, "warmup_ratio", 0.0, 1.0, hi_open=True)
        _check_choice(self, "scheduler", SCHEDULER_CHOICES)
        _check_choice(self, "mode", TRAIN_MODE_CHOICES)


@dataclass
class EvalConfig:
    """Root key ``eval``: generation settings for evaluation."""

    batch_size: int = 64
    max_new_tokens: int = 8
    max_new_tokens_long: int = 56

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_new_tokens", "max_new_tokens_long")


@dataclass
class ExportConfig:
    """Root key ``export``: the ``export`` stage, merged HF LLaVA checkpoints of the trained models
    for lmms-eval's ``llava_hf`` and the command that evaluates them (``export.py``)."""

    #: which trained models (names as in ``selectors``); null = every one
    selectors: Optional[List[str]] = None
    #: lmms-eval task names written into the command
    lmms_tasks: List[str] = field(default_factory=lambda: list(LMMS_EVAL_TASKS))
    #: ``accelerate launch --num_processes`` of the command (one process per GPU)
    num_processes: int = 1

    def __post_init__(self) -> None:
        if self.selectors is not None:
            _check_str_list(self, "selectors")
            for sel in self.selectors:
                if sel not in SELECTOR_CHOICES:
                    raise FieldError("selectors", self.selectors,
                                     f"contains unknown selector {sel!r}; known: {', '.join(SELECTOR_CHOICES)}")
        _check_str_list(self, "lmms_tasks")
        _positive(self, "num_processes")


@dataclass
class SelectionConfig:
    """Root key ``selection``: how much of the pool every selector keeps."""

    ratio: float = 0.2
    seed: int = 0
    #: a finished run directory whose selections (``selection/<name>/ids.json``, same pool) are
    #: used instead of selecting anew: the subset one model chose trains another (7B -> 13B)
    from_run: Optional[str] = None

    def __post_init__(self) -> None:
        _check_range(self, "ratio", 0.0, 1.0, lo_open=True)
        _non_negative(self, "seed")


@dataclass
class WarmupConfig:
    """Group ``warmup``: ICONS step 1, LoRA warmup on a random fraction of the pool."""

    fraction: float = 0.05
    epochs: int = 4
    batch_size: int = 8
    lr: float = 4e-3
    #: which epoch checkpoints give features: last (released ICONS) or all (LESS, lr-weighted)
    checkpoints: str = "last"

    def __post_init__(self) -> None:
        _check_range(self, "fraction", 0.0, 1.0, lo_open=True)
        _positive(self, "epochs", "batch_size", "lr")
        _check_choice(self, "checkpoints", WARMUP_CHECKPOINT_CHOICES)


@dataclass
class GradientConfig:
    """Group ``gradient``: pool gradients Adam-preconditioned (LESS) or plain (``sgd``)."""

    kind: str = "adam"
    batch_size: int = 32
    #: padded tokens per backward (batch rows x longest row); null = batch_size alone decides.
    #: Length-sorted batches then hold many short or few long examples (GPU memory bounded).
    max_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice(self, "kind", GRADIENT_CHOICES)
        _positive(self, "batch_size")
        if self.max_tokens is not None:
            _positive(self, "max_tokens")


@dataclass
class ProjectionConfig:
    """Group ``projection``: none (exact) or a seeded random projection to ``dim`` (``rademacher``:
    dense; ``kronecker``: per-LoRA-matrix ``L G R^T`` sketches summed, best with ``dim`` a
    multiple of the LoRA rank)."""

    kind: str = "none"
    dim: int = 8192
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_choice(self, "kind", PROJECTION_CHOICES)
        _positive(self, "dim")
        _non_negative(self, "seed")
        _check_choice(self, "dtype", FEATURE_DTYPE_CHOICES)


@dataclass
class ConsensusConfig:
    """Group ``consensus``: ICONS's vote, or an aggregation ablation of the paper."""

    method: str = "vote"
    threshold_percentile: float = 80.0
    tie_break: str = "mean_rank"

    def __post_init__(self) -> None:
        _check_choice(self, "method", CONSENSUS_CHOICES)
        _check_range(self, "threshold_percentile", 0.0, 100.0, lo_open=True, hi_open=True)
        _check_choice(self, "tie_break", TIE_BREAK_CHOICES)


@dataclass
class RootConfig:
    """The composed config (``conf/config.yaml``)."""

    seed: int = 0
    stages: List[str] = field(default_factory=lambda: [
        "check", "data", "base", "warmup", "features", "scores", "select", "subset", "train", "eval", "report"])
    selectors: List[str] = field(default_factory=lambda: ["full", "random", "icons"])
    #: null = Hydra's output directory
    run_dir: Optional[str] = None
    cache_dir: str = "${oc.env:ICONS_CACHE,${oc.env:HOME}/.cache/icons}"
    experiment_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)

    def __post_init__(self) -> None:
        _non_negative(self, "seed")
        _check_str_list(self, "stages")
        for stage in self.stages:
            if stage not in KNOWN_STAGES and not _unresolved(stage):
                raise FieldError(
                    "stages",
                    self.stages,
                    f"contains unknown stage {stage!r}; known: {', '.join(KNOWN_STAGES)}",
                )
        _check_str_list(self, "selectors")
        for sel in self.selectors:
            if sel not in SELECTOR_CHOICES:
                raise FieldError("selectors", self.selectors,
                                 f"contains unknown selector {sel!r}; known: {', '.join(SELECTOR_CHOICES)}")
        if self.export.selectors is not None:
            for sel in self.export.selectors:
                if sel not in self.selectors:
                    raise FieldError("export.selectors", self.export.selectors,
                                     f"contains {sel!r}, which is not in selectors={_fmt(self.selectors)}")
        if self.tasks.kind == "llava_benchmarks":
            here = [s for s in self.stages if s in EVAL_STAGES]
            if here:
                raise FieldError("stages", self.stages,
                                 f"contains {' and '.join(here)}, which tasks.kind=llava_benchmarks cannot run: the "
                                 f"real benchmarks have no test split here; evaluate the trained models with "
                                 f"lmms-eval (README, Real scale) and leave {', '.join(EVAL_STAGES)} out of stages")
        _check_nonempty_str(self, "cache_dir", "experiment_name")
        # the global batches must split evenly over devices and micro-batches
        for key, batch in (("train.batch_size", self.train.batch_size), ("warmup.batch_size", self.warmup.batch_size)):
            if _numbers(self.trainer, "devices", "num_nodes"):
                try:
                    accumulation(batch, self.trainer.world_size, self.trainer.micro_batch_size)
                except ValueError as err:
                    raise FieldError(key, batch, str(err)) from None
        if not _unresolved(self.experiment_name) and "/" in self.experiment_name or self.experiment_name in (".", ".."):
            raise FieldError("experiment_name", self.experiment_name, "must be a plain name (no '/')")


# --------------------------------------------------------------------------- #
# ConfigStore
# --------------------------------------------------------------------------- #

#: (group, dataclass) of the config groups; group yaml files start with
#: ``defaults: [schema_<group>, _self_]``.
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "tasks": TasksConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "warmup": WarmupConfig,
    "gradient": GradientConfig,
    "projection": ProjectionConfig,
    "consensus": ConsensusConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent; done on import)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"schema_{group}", node=node)


register_configs()


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X``, ``Optional[X]`` or, for its items, ``List[X]``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) is list:
        return _dataclass_type(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _nested_fields(cls: type) -> dict[str, type | None]:
    """Field name -> nested dataclass type (or None for leaf fields)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _dataclass_type(hints[f.name]) for f in dataclasses.fields(cls)}


def _unknown_keys(tree: Any, cls: type, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    known = _nested_fields(cls)
    unknown: list[str] = []
    for key, value in tree.items():
        if key not in known:
            unknown.append(f"{prefix}{key}")
        elif known[key] is not None and isinstance(value, list):  # a list of dataclasses
            for i, item in enumerate(value):
                unknown.extend(_unknown_keys(item, known[key], f"{prefix}{key}.{i}."))  # type: ignore[arg-type]
        elif known[key] is not None:
            unknown.extend(_unknown_keys(value, known[key], f"{prefix}{key}."))  # type: ignore[arg-type]
    return unknown


def _without_hydra(cfg: Any) -> DictConfig:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.structured(cfg)
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config error: expected a mapping, got {type(cfg).__name__}")
    if "hydra" not in cfg:
        return cfg
    # copy without the hydra node (keep the parent's flags, e.g. struct)
    keys = [k for k in cfg.keys() if k != "hydra"]
    out = OmegaConf.masked_copy(cfg, keys)
    return out


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", None) or err).strip().splitlines()
    first = msg[0].strip() if msg else type(err).__name__
    if key:
        return f"config error: {key}: {first}"
    return f"config error: {first}"


def _locate(node: DictConfig, cls: type, prefix: str) -> str:
    """Dotted prefix of the deepest nested node whose conversion raises a FieldError."""
    for name, sub in _nested_fields(cls).items():
        if sub is None:
            continue
        child = node._get_node(name)
        if child is None or child._is_none() or child._is_missing():
            continue
        if isinstance(child, ListConfig):  # a list of dataclasses: each item is a node of its own
            nodes = [(child._get_node(i), f"{prefix}{name}.{i}.") for i in range(len(child))]
        elif isinstance(child, DictConfig):
            nodes = [(child, f"{prefix}{name}.")]
        else:
            continue
        for sub_node, sub_prefix in nodes:
            try:
                OmegaConf.to_object(sub_node)
            except FieldError:
                return _locate(sub_node, sub, sub_prefix)
            except Exception:  # noqa: BLE001 - reported from the root
                continue
    return prefix


def validate(cfg: Any) -> RootConfig:
    """Check a composed config and return it as a :class:`RootConfig`.

    ``cfg`` is the DictConfig given by ``@hydra.main``/``compose`` (a ``hydra``
    node, if present, is ignored), or a plain mapping / RootConfig. Raises
    :class:`ConfigError` with a one-line message naming the full dotted key.
    """
    node = _without_hydra(cfg)

    # 1. keys outside the schema (e.g. `+data.pool_sise=5`)
    try:
        tree = OmegaConf.to_container(node, resolve=False)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    unknown = _unknown_keys(tree, RootConfig)
    if unknown:
        quoted = ", ".join(f"'{k}'" for k in unknown)
        raise ConfigError(f"config error: unknown key{'s' if len(unknown) > 1 else ''} {quoted}")

    # 2. types (a no-op for a config composed against base_config)
    try:
        if OmegaConf.get_type(node) is not RootConfig:
            node = OmegaConf.merge(OmegaConf.structured(RootConfig), node)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None

    # 3. ranges and choices (__post_init__), interpolations resolved
    try:
        obj = OmegaConf.to_object(node)
    except FieldError as err:
        prefix = _locate(node, RootConfig, "")
        raise ConfigError(err.render(prefix)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    except ValueError as err:  # other checks from __post_init__
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"config error: {first}") from None
    assert isinstance(obj, RootConfig)
    return obj
