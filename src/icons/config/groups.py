"""The schema of the swappable groups: ``model``, ``data``, ``tasks``, ``trainer``, ``logger``.

Each dataclass holds its group's defaults (the YAML options under ``conf/<group>/`` set only
what differs from them); ranges and choices are checked in ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from ..data.mini_llava.build import BenchmarkSpec
from .checks import (FieldError, _check_choice, _check_nonempty_str, _check_range, _check_str_list,
                     _non_negative, _numbers, _positive, _unresolved)

MODEL_KIND_CHOICES = ("tiny_llava", "hf_llava", "llava_1_5")
#: conversation template + image preprocessing (tiny: models/tiny_llava.py; vicuna_v1: LLaVA-1.5's,
#: models/llava15.py)
TEMPLATE_CHOICES = ("tiny", "vicuna_v1")
MODEL_DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DATA_KIND_CHOICES = ("mini_llava", "llava_json")
#: mini_llava: the generated benchmark's tasks (val + test); llava_benchmarks: validation sets built
#: from the real benchmarks' files by ``python -m icons.data.benchmarks`` (no test splits: lmms-eval)
TASKS_KIND_CHOICES = ("mini_llava", "llava_benchmarks")
ON_BAD_RECORD_CHOICES = ("error", "skip")
REPEATED_ID_CHOICES = ("warn", "error")
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
#: example_mean: every example weighs the same; token_mean: HF's default (long answers dominate)
LOSS_CHOICES = ("example_mean", "token_mean")

#: the generated benchmark's defaults (``data/mini_llava/build.py``): the pool's size and noise,
#: the tasks' split sizes and the ten target tasks, stated there once
_BENCH = BenchmarkSpec()
DEFAULT_TASKS: tuple[str, ...] = _BENCH.tasks





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
    """The shipped base's continuation (docs/findings.md records what each phase added): 20k text-only two-hop steps make the LM
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
    #: recompute layer activations in the backward pass (warmup, training, feature extraction):
    #: memory, not results; on for LLaVA-1.5 (its recipe trains with it), off for the tiny model
    gradient_checkpointing: bool = False
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
    seed: int = _BENCH.seed
    pool_size: int = _BENCH.pool_size
    p_duplicate: float = _BENCH.p_duplicate
    p_label_noise: float = _BENCH.p_label_noise
    p_garbage: float = _BENCH.p_garbage
    #: LLaVA JSON/JSONL file (kind=llava_json)
    path: Optional[str] = None
    #: directory the records' ``image`` paths are relative to
    image_root: Optional[str] = None
    on_bad_record: str = "error"
    #: a record whose id an earlier record has: warn (ids are labels: listed by the check, kept;
    #: LLaVA-665K's COCO-derived records share their image's id) | error (a problem of that record)
    repeated_ids: str = "warn"
    #: mini_llava: family weights replacing the default pool's make-up, e.g. {mc: 0.6, science: 0.4};
    #: null = the default (families.FAMILY_SHARES). Typed Any: a typed dict node is closed to new
    #: keys, and OmegaConf cannot merge a dict into a None Dict node; checked below instead.
    family_shares: Any = None

    def __post_init__(self) -> None:
        _check_nonempty_str(self, "name")
        if self.family_shares is not None:
            from ..data.mini_llava.families import FAMILY_SHARES

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
        _check_choice(self, "repeated_ids", REPEATED_ID_CHOICES)


@dataclass
class TasksConfig:
    """Group ``tasks``: the target tasks, their validation (selection) and test (eval) splits."""

    name: str = "mini_llava"
    kind: str = "mini_llava"
    names: List[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    #: kind=mini_llava: items generated per task for the val / test split, and their seed
    n_val: int = _BENCH.n_val
    n_test: int = _BENCH.n_test
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
    #: Lightning's progress bar in warmup, training, feature extraction and evaluation
    progress_bar: bool = True
    #: torchrun/srun: how long a collective may wait (data-parallel stages; torch's NCCL default is 600)
    collective_timeout_s: int = 1800
    #: torchrun/srun: how long the other ranks wait for a stage rank 0 runs alone (outside collectives)
    rank0_wait_s: int = 86400

    def __post_init__(self) -> None:
        _check_choice(self, "accelerator", ACCELERATOR_CHOICES)
        _positive(self, "devices", "num_nodes")
        _check_choice(self, "strategy", STRATEGY_CHOICES)
        if self.strategy == "fsdp" and self.accelerator not in ("gpu", "cuda") and not _unresolved(self.accelerator):
            raise FieldError("strategy", self.strategy, f"needs a GPU ({{prefix}}accelerator={self.accelerator})")
        _check_choice(self, "precision", PRECISION_CHOICES)
        _non_negative(self, "num_workers", "threads")
        _positive(self, "collective_timeout_s", "rank0_wait_s")
        if self.micro_batch_size is not None:
            _positive(self, "micro_batch_size")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


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


