"""Hydra's ConfigStore entries and :func:`validate`: keys, types, ranges, one-line errors.

Importing the package registers the schemas:

* ``base_config``                      -> :class:`~.schema.RootConfig` (first entry of ``config.yaml``)
* ``<group>/schema_<group>``           -> the group's dataclass (first entry of each group's yaml)

OmegaConf checks types (``train.epochs=abc`` fails when the config is composed); ranges and
choices are checked in each dataclass's ``__post_init__``, which runs when :func:`validate` calls
``OmegaConf.to_object``. :func:`validate` also rejects keys that are not in the schema
(``+data.pool_sise=5`` is otherwise accepted silently by Hydra) and turns every failure into a
:class:`~.checks.ConfigError` whose message is one line naming the full dotted key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import ConfigError, FieldError
from .groups import DataConfig, LoggerConfig, ModelConfig, TasksConfig, TrainerConfig
from .schema import ConsensusConfig, GradientConfig, ProjectionConfig, RootConfig, WarmupConfig
from .selector import SelectorConfig

#: The package that holds the YAML configs once installed (the top-level
#: ``conf/`` directory of the repository is shipped as ``icons.conf``).
CONFIG_MODULE = "icons.conf"
#: Name of the primary config (``conf/config.yaml``).
CONFIG_NAME = "config"

_SRC_DIR = Path(__file__).resolve().parents[2]
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
    "selector": SelectorConfig,
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
