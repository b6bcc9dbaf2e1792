"""Structured configs for icons: the schema (types, defaults, ranges) and its validation.

* :mod:`.groups`: the swappable groups (model, data, tasks, trainer, logger);
* :mod:`.schema`: the root config, the pipeline's sections and the ICONS groups;
* :mod:`.checks`: the field checks and the one-line :class:`ConfigError`;
* :mod:`.validate`: Hydra's ConfigStore entries and :func:`validate`.

Importing this package registers the schemas with Hydra. Choices are plain strings (not Enums), so
the values stay ``str`` in both the DictConfig and the validated dataclass.
"""
from .checks import ConfigError, FieldError
from .groups import (DATA_KIND_CHOICES, DEFAULT_TASKS, MODEL_KIND_CHOICES, TASKS_KIND_CHOICES, TEMPLATE_CHOICES,
                     DataConfig, LoggerConfig, LoraConfig, ModelConfig, PhaseConfig, PretrainConfig, TasksConfig,
                     TrainerConfig, shipped_phases)
from .schema import (CONSENSUS_CHOICES, EVAL_STAGES, KNOWN_STAGES, LMMS_EVAL_TASKS, SELECTOR_CHOICES,
                     ConsensusConfig, EvalConfig, ExportConfig, GradientConfig, ProjectionConfig, RootConfig,
                     SelectionConfig, TrainConfig, WarmupConfig)
from .validate import CONFIG_MODULE, CONFIG_NAME, CONFIG_PATH, GROUP_SCHEMAS, conf_dir, register_configs, validate

__all__ = [
    "CONFIG_MODULE", "CONFIG_NAME", "CONFIG_PATH", "CONSENSUS_CHOICES", "DATA_KIND_CHOICES", "DEFAULT_TASKS",
    "EVAL_STAGES", "GROUP_SCHEMAS", "KNOWN_STAGES", "LMMS_EVAL_TASKS", "MODEL_KIND_CHOICES", "SELECTOR_CHOICES",
    "TASKS_KIND_CHOICES", "TEMPLATE_CHOICES", "ConfigError", "ConsensusConfig", "DataConfig", "EvalConfig",
    "ExportConfig", "FieldError", "GradientConfig", "LoggerConfig", "LoraConfig", "ModelConfig", "PhaseConfig",
    "PretrainConfig", "ProjectionConfig", "RootConfig", "SelectionConfig", "TasksConfig", "TrainConfig",
    "TrainerConfig", "WarmupConfig", "conf_dir", "register_configs", "shipped_phases", "validate",
]
