"""The schema of the root config: the pipeline's own sections (``train``, ``eval``, ``export``,
``selection``), the ICONS groups (``warmup``, ``gradient``, ``projection``, ``consensus``) and
:class:`RootConfig`, which holds them with the groups of :mod:`.groups`.

Every default is stated here once; ``conf/config.yaml`` composes the groups and sets Hydra's own
settings only (``python -m icons.run --cfg job`` prints the whole resolved config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .checks import (FieldError, _check_choice, _check_nonempty_str, _check_range, _check_str_list, _fmt,
                     _non_negative, _numbers, _positive, _unresolved)
from .groups import LOSS_CHOICES, DataConfig, LoggerConfig, ModelConfig, TasksConfig, TrainerConfig

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
#: stages that need the tasks' test splits (evaluation and the report of its scores)
EVAL_STAGES = ("eval", "report")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
TRAIN_MODE_CHOICES = ("full", "lora")
WARMUP_CHECKPOINT_CHOICES = ("last", "all")
GRADIENT_CHOICES = ("adam", "sgd")
PROJECTION_CHOICES = ("none", "rademacher", "kronecker")
FEATURE_DTYPE_CHOICES = ("float32", "float16")
CONSENSUS_CHOICES = ("vote", "mean", "max", "rank", "norm", "merge")
TIE_BREAK_CHOICES = ("mean_rank", "index", "random")
SELECTOR_CHOICES = ("full", "random", "icons")
#: lmms-eval's task names for the paper's ten benchmarks, in DEFAULT_TASKS's order. Local-scoring
#: splits: VQAv2 val (the paper reports test-dev, scored by EvalAI from vqav2_test's submission file),
#: VizWiz val and MMBench dev; TextVQA with its OCR tokens in the prompt, as LLaVA-1.5 evaluates it
#: (textvqa_val_ocr: written by the export's script, handoff.py); llava_in_the_wild is judged by GPT-4.
LMMS_EVAL_TASKS: tuple[str, ...] = (
    "vqav2_val",
    "gqa",
    "vizwiz_vqa_val",
    "scienceqa_img",
    "textvqa_val_ocr",
    "pope",
    "mme",
    "mmbench_en_dev",
    "mmbench_cn_dev",
    "llava_in_the_wild",
)


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
    #: steps between the loss and learning rate written to the logger (W&B)
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
                                 f"lmms-eval (README, Reproduce the paper) and leave {', '.join(EVAL_STAGES)} out of stages")
        _check_nonempty_str(self, "cache_dir", "experiment_name")
        # the global batches must split evenly over devices and micro-batches
        from ..distributed import accumulation

        for key, batch in (("train.batch_size", self.train.batch_size), ("warmup.batch_size", self.warmup.batch_size)):
            if _numbers(self.trainer, "devices", "num_nodes"):
                try:
                    accumulation(batch, self.trainer.world_size, self.trainer.micro_batch_size)
                except ValueError as err:
                    raise FieldError(key, batch, str(err)) from None
        if not _unresolved(self.experiment_name) and "/" in self.experiment_name or self.experiment_name in (".", ".."):
            raise FieldError("experiment_name", self.experiment_name, "must be a plain name (no '/')")


