"""Group ``selector``: the baseline selectors' settings (``icons.selectors``) and the forward pass
that gives them their per-example values (the ``forward`` stage)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .checks import FieldError, _check_choice, _positive

#: the consensus methods (group ``consensus``; defined here because RDS+ combines its task scores
#: with any of them, and the schema imports this module)
CONSENSUS_CHOICES = ("vote", "mean", "max", "rank", "norm", "merge", "round_robin", "balanced", "resample",
                     "stratified")
BAND_CHOICES = ("low", "middle", "high")
#: the baseline selectors (``icons.selectors``)
BASELINE_CHOICES = ("length", "perplexity", "el2n", "semdedup", "d2_pruning", "coincide", "rds", "clip_score")
CLIP_NEEDS_A_MODEL = ("contains clip_score, which needs a CLIP model with a text tower (selector.clip_score.model: a "
                      "local CLIPModel checkpoint, e.g. the one LLaVA-1.5's vision tower comes from); the tiny "
                      "LLaVA's vision tower has no text tower, so there is no CLIP-Score to compute")


@dataclass
class BandConfig:
    """Which end of a score a band selector keeps."""

    band: str = "middle"

    def __post_init__(self) -> None:
        _check_choice(self, "band", BAND_CHOICES)


@dataclass
class ClusterConfig:
    """``clusters``: k-means centroids; null = one per 66.5 records (LLaVA-665K's 10,000)."""

    clusters: Optional[int] = None

    def __post_init__(self) -> None:
        if self.clusters is not None:
            _positive(self, "clusters")


@dataclass
class D2Config:
    neighbours: int = 5
    gamma_forward: float = 1.0
    gamma_reverse: float = 0.4

    def __post_init__(self) -> None:
        _positive(self, "neighbours", "gamma_forward", "gamma_reverse")


@dataclass
class CoincideConfig(ClusterConfig):
    tau: float = 0.1
    sigma: float = 1.0
    #: decoder layers whose attention outputs are read; null = COINCIDE's depths (models/forward)
    layers: Optional[List[int]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "tau", "sigma")


@dataclass
class RdsConfig:
    #: how the per-task scores become one selection: RDS+'s round robin, or any consensus method
    consensus: str = "round_robin"

    def __post_init__(self) -> None:
        _check_choice(self, "consensus", CONSENSUS_CHOICES)


@dataclass
class ClipScoreConfig:
    #: a CLIP checkpoint with both towers (HF ``CLIPModel``), e.g. the one LLaVA-1.5's vision tower
    #: comes from; null: clip_score stops with one line (the tiny LLaVA has no text tower)
    model: Optional[str] = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        _positive(self, "batch_size")


@dataclass
class SelectorConfig:
    """Group ``selector``: per-baseline settings and the forward pass's batching and storage."""

    batch_size: int = 32
    #: padded tokens per forward batch (as ``gradient.max_tokens``); null = batch_size alone
    max_tokens: Optional[int] = None
    #: storage of the pooled hidden states (float16 halves a 665K x 4096 store)
    dtype: str = "float32"
    perplexity: BandConfig = field(default_factory=BandConfig)
    el2n: BandConfig = field(default_factory=BandConfig)
    semdedup: ClusterConfig = field(default_factory=ClusterConfig)
    d2_pruning: D2Config = field(default_factory=D2Config)
    coincide: CoincideConfig = field(default_factory=CoincideConfig)
    rds: RdsConfig = field(default_factory=RdsConfig)
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        if self.max_tokens is not None:
            _positive(self, "max_tokens")
        if self.dtype not in ("float32", "float16"):
            raise FieldError("dtype", self.dtype, "must be float32 or float16")
