"""`prefalign init --profile` writes one full params.yaml; resolution checks; serving keeps the safety checker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import ConfigError, ModelConfig, load_config
from prefalign.models.diffusion import (
    BaseResolution,
    base_resolution,
    check_base_resolution,
    check_pipeline_folder,
    load_base_pipeline,
    load_policy_pipeline,
)
from prefalign.profiles import PROFILES, SD15, profile_config, render_profile

ROOT = Path(__file__).resolve().parents[2]


def init(*args: str):
    return CliRunner().invoke(app, ["init", *args])


def dump_without_root(cfg) -> dict:
    dump = cfg.model_dump(mode="json")
    del dump["paths"]["root"]  # the folder of each file: the one value that must differ
    return dump


def dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_init_writes_a_full_params_file_that_loads(tmp_path, profile):
    out = tmp_path / "params.yaml"
    result = init("--profile", profile, "--out", str(out))
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert Path(cfg.paths.root) == tmp_path
    # The file holds exactly the validated profile: nothing dropped, nothing re-typed on the way.
    assert dump_without_root(cfg) == dump_without_root(profile_config(profile))
    dump = cfg.model_dump(mode="json")
    for key, setting in PROFILES[profile].settings.items():
        if not isinstance(setting.value, dict):  # a mapping of sections comes back with its defaults filled in
            assert dotted(dump, key) == setting.value, key
    text = out.read_text()
    # Full: every section is written out, a value the profile leaves at its default included.
    assert all(f"\n{section}:" in text for section in dump if section != "seed")
    assert "\n  # root: the folder of this file" in text and "\n  root:" not in text


def test_demo_profile_is_the_committed_params_file(tmp_path):
    out = tmp_path / "params.yaml"
    assert init("--profile", "demo", "--out", str(out)).exit_code == 0
    assert dump_without_root(load_config(out)) == dump_without_root(load_config(ROOT / "params.yaml"))


def test_sd15_profile_has_the_published_settings(tmp_path):
    out = tmp_path / "params.yaml"
    result = init("--profile", "sd15", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "set model.pretrained_path" in result.stdout
    cfg = load_config(out)
    assert (cfg.model.preset, cfg.model.resolution, cfg.model.allow_resolution_mismatch) == ("sd15", 512, False)
    assert cfg.data.source == "pickapic"
    assert cfg.dpo.beta == 2000 and cfg.dpo.lr == 1e-5 and cfg.dpo.timestep_min == 0 and cfg.dpo.warmup_steps == 0
    assert cfg.dpo.batch_size * cfg.dpo.grad_accum == 32  # the diffusers example's pairs per step on one GPU
    assert (cfg.dro.lr, cfg.dro.margin, cfg.dro.prompt_dropout, cfg.dro.sample_steps) == (1e-4, 1e-3, 0.2, 20)
    assert cfg.dro.batch_size * cfg.dro.grad_accum == 256 and cfg.dro.init_from == "base"
    assert cfg.trainer.mixed_precision == "bf16" and cfg.trainer.compile and not cfg.trainer.gradient_checkpointing
    assert (cfg.eval.sample_steps, cfg.eval.guidance, cfg.eval.images_per_prompt) == (50, 7.5, 5)
    assert 1e-6 <= cfg.reward.lr <= 1e-5 and cfg.reward.backbone != "tiny"
    # Policy methods receive the shared trainer settings at load, not from their own section of the file.
    assert cfg.dpo.mixed_precision == cfg.dro.mixed_precision == "bf16"
    text = out.read_text()
    assert "PLACEHOLDER" in text and "Wallace et al. 2024" in text and "Wu et al. 2025" in text
    assert "\n  mixed_precision: bf16" in text


def test_every_sd15_setting_names_its_source():
    text = " ".join(line.strip().lstrip("# ") for line in render_profile("sd15").splitlines())
    for key, setting in SD15.settings.items():
        assert setting.source in text, key


def test_unknown_profile_is_one_line_naming_the_known_ones(tmp_path):
    result = init("--profile", "sdxl", "--out", str(tmp_path / "params.yaml"))
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "\n" not in message and "'sdxl'" in message and "demo, sd15" in message
    assert not (tmp_path / "params.yaml").exists()


def test_init_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text("seed: 7\n")
    result = init("--profile", "demo", "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_text() == "seed: 7\n"
    assert init("--profile", "demo", "--out", str(out), "--force").exit_code == 0
    assert load_config(out).seed == 0


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_resolution_must_be_a_multiple_of_the_vae_factor(tmp_path):
    sd15 = "model:\n  preset: sd15\n  pretrained_path: models/sd15\n  resolution: {}\n"
    with pytest.raises(ConfigError, match=r"model\.resolution \(500\) must be a multiple .*\(8\)"):
        load_config(write_params(tmp_path, sd15.format(500)))
    assert load_config(write_params(tmp_path, sd15.format(504))).model.resolution == 504
    # The demo VAE halves the side once per extra block: two blocks, factor 2.
    with pytest.raises(ConfigError, match=r"model\.resolution \(15\) must be a multiple .*\(2\)"):
        load_config(write_params(tmp_path, "world:\n  image_size: 15\n"))


def test_base_resolution_reads_the_sd15_configs(tmp_path):
    from prefalign.models.presets import SD15_WIDTHS, sd15_family_unet, sd15_family_vae

    # SD1.5's UNet and VAE on the meta device: their configs cost nothing to write, and hold no weights.
    with torch.device("meta"):
        sd15_family_unet(SD15_WIDTHS, sample_size=64).save_config(tmp_path / "unet")
        sd15_family_vae(SD15_WIDTHS, sample_size=512).save_config(tmp_path / "vae")
    assert base_resolution(tmp_path) == BaseResolution(vae_factor=8, trained=512)


@pytest.fixture(scope="module")
def tiny_components():
    from prefalign.models.presets import build_preset
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    models = build_preset("demo", seed=0)
    return models.vae, models.text_encoder, build_tokenizer(vocabulary_words()), models.unet


@pytest.fixture(scope="module")
def demo_base(tiny_components, tmp_path_factory) -> Path:
    """A demo-sized base as pretrain_base saves it: no safety checker; trained at 16 px (8x8 latents x 2)."""
    from prefalign.models.diffusion import assemble_pipeline

    folder = tmp_path_factory.mktemp("demo_base")
    assemble_pipeline(*tiny_components).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def checked_base(tiny_components, tmp_path_factory) -> Path:
    """The same base saved with a (tiny, random) safety checker and its feature extractor, as SD1.5 ships."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from prefalign.models.diffusion import make_scheduler

    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    clip = CLIPConfig(
        text_config={**small, "vocab_size": 64},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    vae, text_encoder, tokenizer, unet = tiny_components
    folder = tmp_path_factory.mktemp("checked_base")
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler("dpmsolver++"),
        safety_checker=StableDiffusionSafetyChecker(clip),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=True,
    ).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_a_mismatch_with_the_trained_size_fails_unless_allowed(demo_base):
    assert base_resolution(demo_base) == BaseResolution(vae_factor=2, trained=16)
    assert check_base_resolution(ModelConfig(preset="sd15", resolution=16), demo_base).trained == 16
    with pytest.raises(ValueError, match=r"model\.resolution \(32\) differs from the trained size \(16 px"):
        check_base_resolution(ModelConfig(preset="sd15", resolution=32), demo_base)
    allowed = ModelConfig(preset="sd15", resolution=32, allow_resolution_mismatch=True)
    assert check_base_resolution(allowed, demo_base) == BaseResolution(vae_factor=2, trained=16)
    # Allowing another size never allows one the VAE cannot divide.
    odd = ModelConfig(preset="sd15", resolution=33, allow_resolution_mismatch=True)
    with pytest.raises(ValueError, match=r"model\.resolution \(33\) must be a multiple of the VAE .*\(2\)"):
        check_base_resolution(odd, demo_base)


def test_pretrain_base_checks_the_resolution_before_writing_anything(demo_base, tmp_path):
    from prefalign.stages import run_stage

    sd15 = {
        "model.preset": "sd15",
        "model.pretrained_path": str(demo_base),
        "tracking.enabled": False,
    }
    params = write_params(tmp_path, "seed: 0\n")
    with pytest.raises(ValueError, match=r"model\.resolution \(32\).*\(16 px"):
        run_stage("pretrain_base", load_config(params, {**sd15, "model.resolution": 32}))
    assert not (tmp_path / "models").exists()
    cfg = load_config(params, {**sd15, "model.resolution": 32, "model.allow_resolution_mismatch": True})
    assert run_stage("pretrain_base", cfg)["source"] == str(demo_base)


def test_the_placeholder_base_folder_fails_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist; set model\.pretrained_path"):
        check_pipeline_folder(tmp_path / "models/sd15")


def test_fp32_on_a_gpu_warns_for_real_models_only(tmp_path, monkeypatch, caplog):
    import prefalign.config

    monkeypatch.setattr(prefalign.config, "_cuda_available", lambda: True)
    sd15 = "model:\n  preset: sd15\n  pretrained_path: models/sd15\n  resolution: 512\n"
    with caplog.at_level(logging.WARNING, logger="prefalign.config"):
        load_config(write_params(tmp_path, sd15))
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        load_config(write_params(tmp_path, sd15 + "trainer:\n  mixed_precision: bf16\n"))
        load_config(write_params(tmp_path, "seed: 0\n"))  # the demo trains in fp32 on purpose
    assert len(warned) == 1 and "trainer.mixed_precision" in warned[0]
    assert not caplog.records


def test_serving_keeps_the_safety_checker_the_base_has(checked_base, demo_base):
    served = load_policy_pipeline(checked_base, None)
    assert served.safety_checker is not None and served.feature_extractor is not None
    assert served.config.requires_safety_checker
    image = served("a red circle", num_inference_steps=1, height=16, width=16, output_type="np")
    assert isinstance(image.nsfw_content_detected, list)  # the checker ran on the image
    # Training and featurizing load the same folder without it: it only filters decoded images.
    assert load_base_pipeline(checked_base).safety_checker is None
    # The demo base has none, so serving it is what it was: no checker, none required.
    demo = load_policy_pipeline(demo_base, None)
    assert demo.safety_checker is None and demo.feature_extractor is None
    assert not demo.config.requires_safety_checker
