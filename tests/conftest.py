"""Shared fixtures: offline environment, a session cache dir, config composition."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from icons.config import CONFIG_NAME, conf_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, no W&B: every test runs with W&B disabled and HF offline.

    A test that wants W&B files sets ``WANDB_MODE=offline`` itself.
    """
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def icons_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache directory for the whole session (generated data, tiny base model).

    Also exported as ``ICONS_CACHE`` for the rest of the session, so configs
    composed afterwards resolve ``cache_dir`` to it.
    """
    path = tmp_path_factory.mktemp("icons_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ICONS_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def config_dir() -> Path:
    """Absolute path of the repository's ``conf/``."""
    assert CONF_DIR.is_dir(), CONF_DIR
    assert conf_dir() == CONF_DIR
    return CONF_DIR


def compose_config(
    overrides: Sequence[str] = (),
    *,
    return_hydra_config: bool = False,
    config_name: str = CONFIG_NAME,
) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (``key=value``, ``+experiment=smoke``)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(
            config_name=config_name,
            overrides=list(overrides),
            return_hydra_config=return_hydra_config,
        )


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """The :func:`compose_config` helper as a fixture."""
    return compose_config

