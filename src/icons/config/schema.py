"""The schema of the root config: the pipeline's own sections (``train``, ``eval``, ``export``,
``selection``), the ICONS groups (``warmup``, ``gradient``, ``projection``, ``consensus``) and
:class:`RootConfig`, which holds them with the groups of :mod:`.groups`.

Every default is stated here once; ``conf/config.yaml`` composes the groups and sets Hydra's own
settings only (``python -m icons.run --cfg job`` prints the whole resolved config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .checks import (FieldError, _check_choice, _check_nonempty_str, _check_range, _check_str_list, _fmt,
                     _non_negative, _numbers, _positive, _unresolved)
from .groups import LOSS_CHOICES, DataConfig, LoggerConfig, ModelConfig, TasksConfig, TrainerConfig
from .selector import BASELINE_CHOICES, CLIP_NEEDS_A_MODEL, CONSENSUS_CHOICES, SelectorConfig

#: Pipeline stages, in the order ``run.py`` may execute them.
KNOWN_STAGES: tuple[str, ...] = (
    "check",
    "data",
    "base",
    "warmup",
    "features",
    "scores",
    "forward",
    "select",
    "subset",
    "train",
    "export",
    "eval",
    "report",
    "study",
)
#: stages that need the tasks' test splits (evaluation and the report of its scores)
EVAL_STAGES = ("eval", "report", "study")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
TRAIN_MODE_CHOICES = ("full", "lora")
WARMUP_CHECKPOINT_CHOICES = ("last", "all")
GRADIENT_CHOICES = ("adam", "sgd")
PROJECTION_CHOICES = ("none", "rademacher", "kronecker")
FEATURE_DTYPE_CHOICES = ("float32", "float16")
TIE_BREAK_CHOICES = ("mean_rank", "index", "random")
#: full, random, icons (the consensus.method's row: vote = ICONS), any other consensus method on the
#: same scores (its own row), specialist-<task>: one task's own top (the paper's specialist), and the
#: baselines (``icons.selectors``)
SELECTOR_CHOICES = ("full", "random", "icons", *[m for m in CONSENSUS_CHOICES if m != "vote"], *BASELINE_CHOICES)
SPECIALIST = "specialist-"


def selector_error(sel: str, tasks) -> str | None:
    """Why ``sel`` is not a selector, or None."""
    if sel in SELECTOR_CHOICES:
        return None
    if sel.startswith(SPECIALIST) and not _unresolved(sel):
        task = sel[len(SPECIALIST):]
        return None if task in list(tasks) else f"contains {sel!r}, a specialist of a task that is not in tasks.names"
    return f"contains unknown selector {sel!r}; known: {', '.join(SELECTOR_CHOICES)}, {SPECIALIST}<task>"
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
                if sel not in SELECTOR_CHOICES and not sel.startswith(SPECIALIST):
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
    """Group ``warmup``: ICONS step 1, LoRA warmup on a random fraction of the pool. The defaults
    are the released ICONS code's (``warmup=icons_release``): one checkpoint early in one epoch over
    the whole pool; ``warmup=less`` is LESS's, 4 epochs on 5%."""

    fraction: float = 1.0
    epochs: int = 1
    batch_size: int = 8
    lr: float = 4e-3
    #: which epoch checkpoints give features: last (released ICONS) or all (LESS, lr-weighted)
    checkpoints: str = "last"
    #: stop after this share of the run's steps, keeping that checkpoint (null: run them all); the
    #: released ICONS code takes checkpoint-500 of a LoRA run over the whole pool, near its peak lr
    stop_after: Optional[float] = 0.1

    def __post_init__(self) -> None:
        _check_range(self, "fraction", 0.0, 1.0, lo_open=True)
        if self.stop_after is not None:
            _check_range(self, "stop_after", 0.0, 1.0, lo_open=True)
        _positive(self, "epochs", "batch_size", "lr")
        _check_choice(self, "checkpoints", WARMUP_CHECKPOINT_CHOICES)


@dataclass
class GradientConfig:
    """Group ``gradient``: pool gradients plain (``sgd``, the released ICONS scripts) or
    Adam-preconditioned (``adam``, LESS)."""

    kind: str = "sgd"
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
    #: stratified: k-means clusters of the score profiles (about two per task)
    strata: int = 20

    def __post_init__(self) -> None:
        _check_choice(self, "method", CONSENSUS_CHOICES)
        _positive(self, "strata")
        _check_range(self, "threshold_percentile", 0.0, 100.0, lo_open=True, hi_open=True)
        _check_choice(self, "tie_break", TIE_BREAK_CHOICES)


def _feature_choices() -> dict:
    less = ["gradient.kind=adam", "warmup.fraction=0.05", "warmup.epochs=4", "warmup.stop_after=null"]  # warmup=less
    return {"adam": ["gradient.kind=adam"], "less_last": less, "less": [*less, "warmup.checkpoints=all"]}


@dataclass
class StudyConfig:
    """Root key ``study``: the miniature study's analyses (the ``study`` stage,
    ``+experiment=miniature_study``). Every sub-run shares this run's results by key."""

    #: the main table's seeds (warmup order and subset, LoRA init, training order)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    #: trained and evaluated at every seed
    selectors: List[str] = field(default_factory=lambda: ["random", "icons", "resample", "round_robin"])
    #: full data at every seed (else at the first, the reference of every seed's relative performance)
    full_every_seed: bool = False
    #: the paper's aggregation ablation, at the first seed (vote is the icons row)
    aggregation: List[str] = field(default_factory=lambda: ["mean", "max", "rank", "norm", "merge"])
    #: each task's own top (its specialist), trained and tested on that task, at the first seed
    specialists: bool = True
    #: the ratio sweep for random and icons, at the first seed (selection.ratio is the main runs')
    ratios: List[float] = field(default_factory=lambda: [0.05, 0.1, 0.4, 0.6])
    #: feature recipes beside the default (the released code's), at the first seed: name -> dotted
    #: overrides. adam: Adam-preconditioned at the same checkpoint; less_last / less: LESS's warmup
    #: (4 epochs on 5%) with Adam features from its last / every checkpoint
    feature_choices: Dict[str, List[str]] = field(default_factory=_feature_choices)

    def __post_init__(self) -> None:
        _check_str_list(self, "selectors")
        for r in self.ratios:
            if not (isinstance(r, (int, float)) and 0 < r <= 1):
                raise FieldError("ratios", list(self.ratios), "must hold ratios in (0, 1]")
        if not self.seeds:
            raise FieldError("seeds", list(self.seeds), "must not be empty")


@dataclass
class RootConfig:
    """The composed config (``conf/config.yaml``)."""

    seed: int = 0
    stages: List[str] = field(default_factory=lambda: [
        "check", "data", "base", "warmup", "features", "scores", "forward", "select", "subset", "train", "eval",
        "report"])
    #: resample: the consensus beyond the paper with the best mean relative performance over the
    #: miniature study's three seeds (72.0 ± 0.3 against round_robin's 60.8, the vote's 58.0 and
    #: random's 73.7; docs/findings.md)
    selectors: List[str] = field(default_factory=lambda: ["full", "random", "icons", "resample"])
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
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

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
            if (why := selector_error(sel, self.tasks.names)) is not None:
                raise FieldError("selectors", self.selectors, why)
        if "clip_score" in self.selectors and not self.selector.clip_score.model:
            raise FieldError("selectors", self.selectors, CLIP_NEEDS_A_MODEL)
        method = self.consensus.method
        if "icons" in self.selectors and method != "vote" and method in self.selectors:
            raise FieldError("selectors", self.selectors, f"names {method!r} twice (icons with "
                                                         f"consensus.method={method} is that row)")
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


