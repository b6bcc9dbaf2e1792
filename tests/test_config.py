"""Config composition and validation: defaults, experiments, one-line errors."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf

from icons.config import (
    CONFIG_PATH,
    KNOWN_STAGES,
    ConfigError,
    RootConfig,
    conf_dir,
    validate,
)


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


def test_default_composes_and_validates(compose_cfg):
    cfg = compose_cfg()
    obj = validate(cfg)
    assert isinstance(obj, RootConfig)
    assert obj.model.kind == "tiny_llava"
    assert obj.data.pool_size == 12000
    assert obj.tasks.names[0] == "vqav2" and len(obj.tasks.names) == 10
    assert obj.trainer.accelerator == "cpu"
    assert obj.logger.kind == "wandb"
    assert obj.stages == ["check", "data", "base", "warmup", "features", "scores", "forward", "select", "subset",
                          "train", "eval", "report"]
    assert obj.selectors == ["full", "random", "icons", "resample"]
    assert (obj.gradient.kind, obj.projection.kind, obj.consensus.method) == ("sgd", "none", "vote")
    assert (obj.warmup.fraction, obj.warmup.epochs, obj.warmup.stop_after) == (1.0, 1, 0.1)
    assert obj.selection.ratio == pytest.approx(0.2)
    assert "${" not in obj.cache_dir


def test_yaml_defaults_match_dataclass_defaults(compose_cfg):
    """conf/*.yaml repeat the schema defaults for readability; they must not drift."""
    from_yaml = validate(compose_cfg())
    from_schema = OmegaConf.to_object(OmegaConf.structured(RootConfig))
    assert from_yaml == from_schema


def test_hydra_settings(compose_cfg):
    cfg = compose_cfg(return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/default/")
    assert cfg.hydra.sweep.dir.startswith("multirun/default/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert cfg.hydra.job.chdir is False
    # the hydra node is ignored by validate
    assert validate(cfg) == validate(compose_cfg())


def test_experiment_smoke_composes(compose_cfg):
    cfg = compose_cfg(["+experiment=smoke"], return_hydra_config=True)
    obj = validate(cfg)
    assert obj.experiment_name == "smoke"
    assert obj.data.name == "mini_llava_smoke" and obj.data.pool_size == 600
    assert obj.data.p_duplicate == pytest.approx(0.15)  # inherited from mini_llava
    assert obj.tasks.n_val == 8 and obj.tasks.n_test == 24
    assert obj.tasks.names == list(validate(compose_cfg()).tasks.names)
    assert obj.train.epochs == 1
    assert obj.logger.kind == "none"
    assert cfg.hydra.run.dir.startswith("outputs/smoke/")


def test_unknown_experiment(compose_cfg):
    with pytest.raises(MissingConfigException):
        compose_cfg(["+experiment=nope"])


def test_group_options_set_their_values(compose_cfg):
    obj = validate(compose_cfg(["trainer=gpu", "logger=none", "data=mini_llava_smoke"]))
    assert obj.trainer.accelerator == "gpu" and obj.trainer.precision == "bf16-mixed"
    assert obj.logger.kind == "none"
    assert obj.data.pool_size == 600


def test_cache_dir_from_env(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("ICONS_CACHE", str(tmp_path))
    assert validate(compose_cfg()).cache_dir == str(tmp_path)
    monkeypatch.delenv("ICONS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert validate(compose_cfg()).cache_dir == str(tmp_path / "home" / ".cache" / "icons")


def test_logger_mode_from_env(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert validate(compose_cfg()).logger.mode == "offline"


# one misspelled key and one out-of-range value per group / root section
MISSPELLED = [
    ("model", "model.patch_sise", "4"),
    ("model", "model.lora.rr", "4"),
    ("data", "data.pool_sise", "5"),
    ("tasks", "tasks.n_vall", "3"),
    ("trainer", "trainer.devises", "2"),
    ("logger", "logger.projet", "x"),
    ("train", "train.epoch", "2"),
    ("eval", "eval.batch_sise", "2"),
    ("selection", "selection.ration", "0.5"),
    ("warmup", "warmup.fracton", "0.1"),
    ("gradient", "gradient.knd", "sgd"),
    ("projection", "projection.dimm", "5"),
    ("consensus", "consensus.threshold", "50"),
]

OUT_OF_RANGE = [
    ("model", "model.patch_size", "0", "config error: model.patch_size=0 must be > 0"),
    ("model", "model.lora.dropout", "1.0", "config error: model.lora.dropout=1.0 must be in [0, 1)"),
    ("model", "model.image_size", "30", "config error: model.image_size=30 must be a multiple of model.patch_size=8"),
    ("model", "model.kind", "gpt", "config error: model.kind=gpt must be one of tiny_llava, hf_llava, llava_1_5"),
    ("data", "data.pool_size", "0", "config error: data.pool_size=0 must be > 0"),
    ("data", "data.p_garbage", "0.9", None),
    ("data", "data.on_bad_record", "ignore", "config error: data.on_bad_record=ignore must be one of error, skip"),
    ("tasks", "tasks.n_val", "0", "config error: tasks.n_val=0 must be > 0"),
    ("tasks", "tasks.names", "[]", "config error: tasks.names=[] must not be empty"),
    ("trainer", "trainer.devices", "0", "config error: trainer.devices=0 must be > 0"),
    ("trainer", "trainer.precision", "8-true", None),
    ("logger", "logger.mode", "sometimes", "config error: logger.mode=sometimes must be one of online, offline, disabled"),
    ("train", "train.warmup_ratio", "1.0", "config error: train.warmup_ratio=1.0 must be in [0, 1)"),
    ("train", "train.mode", "lorra", "config error: train.mode=lorra must be one of full, lora"),
    ("eval", "eval.batch_size", "0", "config error: eval.batch_size=0 must be > 0"),
    ("selection", "selection.ratio", "0", "config error: selection.ratio=0.0 must be in (0, 1]"),
    ("warmup", "warmup.fraction", "0", "config error: warmup.fraction=0.0 must be in (0, 1]"),
    ("warmup", "warmup.checkpoints", "first", "config error: warmup.checkpoints=first must be one of last, all"),
    ("gradient", "gradient.kind", "adagrad", "config error: gradient.kind=adagrad must be one of adam, sgd"),
    ("projection", "projection.dim", "0", "config error: projection.dim=0 must be > 0"),
    ("consensus", "consensus.threshold_percentile", "100",
     "config error: consensus.threshold_percentile=100.0 must be in (0, 100)"),
    ("consensus", "consensus.method", "median", None),
]


@pytest.mark.parametrize("group,key,value", MISSPELLED, ids=[k for _, k, _ in MISSPELLED])
def test_misspelled_key_rejected_by_compose(compose_cfg, group, key, value):
    with pytest.raises(HydraException) as info:
        compose_cfg([f"{key}={value}"])
    assert key in str(info.value)


@pytest.mark.parametrize("group,key,value", MISSPELLED, ids=[k for _, k, _ in MISSPELLED])
def test_misspelled_key_added_with_plus_rejected_by_validate(compose_cfg, group, key, value):
    cfg = compose_cfg([f"+{key}={value}"])  # Hydra accepts this silently
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert _one_line(info.value) == f"config error: unknown key '{key}'"


def test_unknown_root_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"^config error: unknown key 'foo'$"):
        validate(compose_cfg(["+foo=1"]))


@pytest.mark.parametrize(
    "group,key,value,message", OUT_OF_RANGE, ids=[f"{k}={v}" for _, k, v, _ in OUT_OF_RANGE]
)
def test_out_of_range_rejected(compose_cfg, group, key, value, message):
    cfg = compose_cfg([f"{key}={value}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = _one_line(info.value)
    assert msg.startswith("config error: ")
    assert key in msg
    if message is not None:
        assert msg == message


def test_selection_ratio_message_exact(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["selection.ratio=1.5"]))
    assert str(info.value) == "config error: selection.ratio=1.5 must be in (0, 1]"
    assert isinstance(info.value, ValueError)


def test_probabilities_must_sum_below_one(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["data.p_garbage=0.9"]))
    assert str(info.value) == (
        "config error: data.p_duplicate+data.p_label_noise+data.p_garbage=1.15 must be < 1"
    )


def test_unknown_stage_rejected(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["stages=[data,bse,train]"]))
    msg = _one_line(info.value)
    assert msg.startswith("config error: stages=[data, bse, train] contains unknown stage 'bse'")


def test_every_known_stage_accepted(compose_cfg):
    stages = ",".join(KNOWN_STAGES)
    assert validate(compose_cfg([f"stages=[{stages}]"])).stages == list(KNOWN_STAGES)


def test_unknown_selector_rejected(compose_cfg):
    with pytest.raises(ConfigError, match=r"unknown selector 'clip'"):
        validate(compose_cfg(["selectors=[full,clip]"]))


@pytest.mark.parametrize("override", ["consensus=mean", "consensus=merge", "projection=rademacher", "gradient=adam",
                                      "warmup=less"])
def test_group_options_compose(compose_cfg, override):
    validate(compose_cfg([override]))


def test_empty_selectors_rejected(compose_cfg):
    with pytest.raises(ConfigError, match=r"^config error: selectors=\[\] must not be empty$"):
        validate(compose_cfg(["selectors=[]"]))


def test_wrong_type_rejected(compose_cfg):
    with pytest.raises(HydraException) as info:
        compose_cfg(["train.epochs=abc"])
    assert "train.epochs" in str(info.value)


def test_wrong_type_rejected_by_validate_for_plain_mapping(compose_cfg):
    """A saved config (.hydra/config.yaml) loaded without its schema is type-checked too."""
    data = OmegaConf.to_container(compose_cfg(), resolve=False)
    data["train"]["epochs"] = "abc"
    with pytest.raises(ConfigError) as info:
        validate(OmegaConf.create(data))
    msg = _one_line(info.value)
    assert msg.startswith("config error: train.epochs: ")


def test_saved_config_round_trip(compose_cfg, tmp_path):
    cfg = compose_cfg(["+experiment=smoke", "selection.ratio=0.5"])
    path = tmp_path / "config.yaml"
    OmegaConf.save(cfg, path)
    assert validate(OmegaConf.load(path)) == validate(cfg)
    assert validate(OmegaConf.to_container(cfg)).selection.ratio == 0.5


def test_config_location():
    assert conf_dir().joinpath("config.yaml").is_file()
    assert CONFIG_PATH in ("pkg://icons.conf", str(conf_dir()))


def test_paper_experiment_trains_the_projector_at_llava_lr(compose_cfg):
    from icons.config import validate

    cfg = validate(compose_cfg(["+experiment=llava_20pct"]))
    assert cfg.train.mode == "lora" and cfg.train.projector_lr == 2e-5 and cfg.train.lr == 2e-4
    with pytest.raises(ConfigError, match="train.projector_lr"):
        validate(compose_cfg(["train.projector_lr=0"]))


def test_base_phases_are_validated_per_item(compose_cfg):
    """model.pretrain.phases is a list of PhaseConfig: an error names the phase's index."""
    from icons.stages import base_recipe

    cfg = compose_cfg()
    validate(cfg)
    assert [(p["kind"], p["examples"]) for p in base_recipe(cfg)["phases"]] == [
        ("two_hop", 640000), ("stream", 192000), ("stream", 192000), ("stream", 128000), ("stream", 128000),
        ("stream", 128000), ("stream", 128000), ("stream", 128000)]
    assert "phases" not in base_recipe(compose_cfg(["model.pretrain.phases=[]"]))
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model.pretrain.phases.1.lr=-1"]))
    assert _one_line(info.value) == "config error: model.pretrain.phases.1.lr=-1.0 must be > 0"
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model.pretrain.phases.0.kind=text"]))
    assert _one_line(info.value).startswith("config error: model.pretrain.phases.0.kind=text must be one of")
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["+model.pretrain.phases.2.step=1"]))
    assert _one_line(info.value) == "config error: unknown key 'model.pretrain.phases.2.step'"
