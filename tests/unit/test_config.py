"""The one config: params.yaml validates, bad keys fail naming the key, dvc.yaml and the CLI agree."""

from pathlib import Path

import pytest
import yaml

from prefalign.config import ConfigError, PipelineConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


def write_params(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_validate_and_equal_the_documented_defaults():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model_dump(exclude={"paths"}) == PipelineConfig().model_dump(exclude={"paths"})
    assert Path(cfg.paths.root) == ROOT


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description or isinstance(field.default_factory, type), f"{model.__name__}.{name}"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub)

    walk(PipelineConfig)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dpo\.betta"):
        load_config(write_params(tmp_path, "dpo:\n  betta: 5000\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dpo\.steps"):
        load_config(write_params(tmp_path, "dpo:\n  steps: many\n"))


def test_negative_learning_rate_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.lr"):
        load_config(write_params(tmp_path, "reward:\n  lr: -0.001\n"))


def test_non_positive_beta_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        load_config(write_params(tmp_path, "dpo:\n  beta: 0\n"))


def test_message_names_the_file(tmp_path):
    path = write_params(tmp_path, "unknown_section: 1\n")
    with pytest.raises(ConfigError, match="params.yaml"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dotted_overrides_are_validated_like_the_file(tmp_path):
    path = write_params(tmp_path, "dpo:\n  beta: 2000\n")
    cfg = load_config(path, {"dpo.beta": 5000, "trainer.lora.rank": 4})
    assert cfg.dpo.beta == 5000.0 and isinstance(cfg.dpo.beta, float) and cfg.dpo.lora.rank == 4
    with pytest.raises(ConfigError, match=r"trainer\.lora\.rank"):
        load_config(path, {"trainer.lora.rank": -1})


def test_trainer_settings_are_set_once_for_every_policy_method(tmp_path):
    path = write_params(tmp_path, "trainer:\n  checkpoint_every: 7\n  lora:\n    rank: 2\n")
    cfg = load_config(path)
    assert cfg.dpo.checkpoint_every == cfg.dro.checkpoint_every == 7
    assert cfg.dpo.lora == cfg.dro.lora == cfg.trainer.lora and cfg.dpo.lora.rank == 2
    with pytest.raises(ConfigError, match=r"dro\.lora: shared by every policy trainer; set trainer\.lora instead"):
        load_config(path, {"dro.lora.rank": 4})


def test_parse_override():
    assert parse_override("dpo.beta=5000") == ("dpo.beta", 5000)
    assert parse_override("model.unet_channels=[32, 64]") == ("model.unet_channels", [32, 64])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_demo_resolution_follows_the_world(tmp_path):
    """Set once: the demo model's resolution is the world's image size, whichever of the two is written."""
    assert load_config(write_params(tmp_path, "world:\n  image_size: 24\n")).model.resolution == 24
    assert load_config(write_params(tmp_path, "model:\n  resolution: 16\n")).model.resolution == 16
    assert load_config(write_params(tmp_path, "")).model.resolution == 16


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="resolution"):
        load_config(write_params(tmp_path, "model:\n  resolution: 32\n"))
    with pytest.raises(ConfigError, match="pretrained_path"):
        load_config(write_params(tmp_path, "model:\n  preset: sd15\n  resolution: 512\n"))
    with pytest.raises(ConfigError, match="resolution is required"):
        load_config(write_params(tmp_path, "model:\n  preset: sd15\n  pretrained_path: /srv/sd15\n"))
    with pytest.raises(ConfigError, match="split"):
        load_config(write_params(tmp_path, "data:\n  split_train: 0.9\n  split_val: 0.1\n"))
    with pytest.raises(ConfigError, match="sdxl.*not supported"):
        load_config(write_params(tmp_path, "model:\n  preset: sdxl\n  pretrained_path: /models/sdxl\n"))


def test_base_model_dir_is_the_local_folder_for_sd15_and_the_pipeline_output_otherwise(tmp_path):
    demo = load_config(write_params(tmp_path, "seed: 0\n"))
    assert demo.base_model_dir() == (tmp_path / "models/base").resolve()
    sd15_yaml = "model:\n  preset: sd15\n  resolution: 512\n  pretrained_path: "
    sd15 = load_config(write_params(tmp_path, sd15_yaml + "../weights/sd15\n"))
    assert sd15.base_model_dir() == (tmp_path / "../weights/sd15").resolve()
    absolute = load_config(write_params(tmp_path, sd15_yaml + "/srv/sd15\n"))
    assert absolute.base_model_dir() == Path("/srv/sd15")


def test_dvc_yaml_agrees_with_stages_config_and_cli():
    import importlib

    from prefalign.stages import STAGES

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(dvc) == STAGES
    for name in STAGES:
        assert callable(getattr(importlib.import_module(f"prefalign.stages.{name}"), f"run_{name}"))
    sections = set(PipelineConfig.model_fields)
    for name, stage in dvc.items():
        assert stage["cmd"] == f"prefalign stage {name}", "hyperparameters never go on the command line"
        for key in stage.get("params", []):
            section, *rest = key.split(".")
            assert section in sections, f"{name}: params key {key} is not in the config"
            model = PipelineConfig.model_fields[section].annotation
            if rest:
                assert rest[0] in model.model_fields, f"{name}: params key {key} is not in the config"
        outputs = {next(iter(o)) if isinstance(o, dict) else o for st in dvc.values() for o in st.get("outs", [])}
        outputs |= {next(iter(m)) for st in dvc.values() for m in st.get("metrics", [])}
        for dep in stage.get("deps", []):
            assert dep in outputs or (ROOT / dep).exists(), f"{name}: dep {dep} is neither code nor a stage output"
