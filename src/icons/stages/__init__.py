"""The pipeline's stages, one module each, in the order they run: ``check``, ``data``, ``base``,
``warmup`` (ICONS step 1), ``features`` (2), ``scores`` (3, the specialist), ``forward`` (what the
baseline selectors read), ``select`` (4-5, the generalist, and every other selector), ``subset``, ``train`` (6), ``export``, ``eval``, ``report``; and ``study``, the
miniature study's analyses (``icons.study``).

Each ``stage_<name>(run)`` is a plain function over files: it reads what earlier stages wrote,
writes its own result and manifest through :func:`icons.pipeline.cached.cached_stage`, and can be
called from Python as it is (``icons.pipeline.run_stages`` runs the configured list).
"""
from ..models.loading import base_recipe
from .base import stage_base
from .check import stage_check
from .data import load_pool, load_val, stage_data
from .eval import stage_eval
from .export import stage_export
from .features import stage_features
from .forward import stage_forward
from .report import stage_report
from .scores import stage_scores
from .select import stage_select
from .subset import stage_subset
from .train import stage_train
from .warmup import stage_warmup


def stage_study(run):
    """The miniature study's analyses as sub-runs of this pipeline (``icons.study``)."""
    from ..study.driver import stage_study as study

    return study(run)


#: name -> stage, in the order a full run takes them
STAGES = {"check": stage_check, "data": stage_data, "base": stage_base, "warmup": stage_warmup,
          "features": stage_features, "scores": stage_scores, "forward": stage_forward, "select": stage_select, "subset": stage_subset,
          "train": stage_train, "export": stage_export, "eval": stage_eval, "report": stage_report,
          "study": stage_study}

#: stages every process of a torchrun/srun job runs (each its share); rank 0 runs the others alone
DATA_PARALLEL = {"warmup", "features", "forward", "train"}

__all__ = ["DATA_PARALLEL", "STAGES", "base_recipe", "load_pool", "load_val", "stage_base", "stage_check",
           "stage_data", "stage_eval", "stage_export", "stage_features", "stage_forward", "stage_report", "stage_scores",
           "stage_select", "stage_study", "stage_subset", "stage_train", "stage_warmup"]
