"""Model presets: SD1.5's architecture from config, sd-mini as its 1/8-width copy, the demo model; no download."""

import pytest
import torch

from prefalign.config import ModelConfig
from prefalign.models.presets import PRESET_NAMES, build_preset, latent_side, parameter_counts

# The published runwayml/stable-diffusion-v1-5 checkpoint's parameter counts.
SD15_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def sd_mini():
    return build_preset("sd-mini", seed=0)


@pytest.fixture(scope="module")
def sd15_meta():
    # The meta device allocates nothing: SD1.5's 4.3 GB of float32 weights are never built.
    return build_preset("sd15-random", device="meta")


def test_sd_mini_unet_maps_latents_and_text_to_latents(sd_mini):
    assert sd_mini.resolution == 128 and latent_side(sd_mini) == 16
    latents, text = torch.randn(3, 4, 16, 16), torch.randn(3, 77, 96)
    with torch.no_grad():
        out = sd_mini.unet(latents, torch.tensor([0, 500, 999]), encoder_hidden_states=text).sample
    assert out.shape == (3, 4, 16, 16)
    assert torch.isfinite(out).all()


def test_sd_mini_text_encoder_and_vae_feed_the_unet(sd_mini):
    ids = torch.randint(0, sd_mini.text_encoder.config.vocab_size, (2, 77))
    with torch.no_grad():
        text = sd_mini.text_encoder(ids)[0]
        latents = sd_mini.vae.encode(torch.rand(2, 3, 128, 128) * 2 - 1).latent_dist.mode()
    assert text.shape == (2, 77, 96)
    assert latents.shape == (2, 4, 16, 16)
    assert sd_mini.vae.config.scaling_factor == pytest.approx(0.18215)


def test_sd15_random_is_the_published_architecture(sd15_meta):
    counts = parameter_counts(sd15_meta)
    assert {k: counts[k] for k in SD15_COUNTS} == SD15_COUNTS
    assert sd15_meta.resolution == 512 and latent_side(sd15_meta) == 64
    unet = sd15_meta.unet.config
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.layers_per_block == 2 and unet.cross_attention_dim == 768 and unet.attention_head_dim == 8
    assert unet.sample_size == 64
    assert tuple(sd15_meta.vae.config.block_out_channels) == (128, 256, 512, 512)
    text = sd15_meta.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (3072, 49408, 77)
    with torch.no_grad():
        out = sd15_meta.unet(
            torch.empty(1, 4, 64, 64, device="meta"),
            torch.tensor([10], device="meta"),
            encoder_hidden_states=torch.empty(1, 77, 768, device="meta"),
        ).sample
    assert out.shape == (1, 4, 64, 64)


def test_sd_mini_is_sd15_with_every_width_divided_by_8(sd_mini, sd15_meta):
    def layer_kinds(model):
        return [type(module).__name__ for module in model.modules()]

    for part in ("unet", "vae", "text_encoder"):
        assert layer_kinds(getattr(sd_mini, part)) == layer_kinds(getattr(sd15_meta, part)), part
    assert tuple(sd_mini.unet.config.block_out_channels) == (40, 80, 160, 160)
    assert tuple(sd_mini.vae.config.block_out_channels) == (16, 32, 64, 64)
    mini, full = parameter_counts(sd_mini), parameter_counts(sd15_meta)
    # Weights scale with width squared (64x); biases and norms only 8x, hence "about".
    assert 60 < full["unet"] / mini["unet"] < 66
    assert 60 < full["vae"] / mini["vae"] < 66
    # The kept 49408-token vocabulary (an 8x-only embedding) pulls the whole model to about 1/51.
    assert 45 < full["total"] / mini["total"] < 66


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_preset("sd-mini", seed=5).unet.state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    again = build_preset("sd-mini", seed=5).unet.state_dict()
    other = build_preset("sd-mini", seed=6).unet.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_demo_preset_is_the_default_model_config():
    demo = build_preset("demo")
    cfg = ModelConfig()
    assert demo.resolution == cfg.resolution
    assert tuple(demo.unet.config.block_out_channels) == cfg.unet_channels
    assert tuple(demo.vae.config.block_out_channels) == cfg.vae_channels
    assert demo.text_encoder.config.hidden_size == cfg.text_hidden
    assert demo.unet.config.sample_size == latent_side(demo) == 8


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("sdxl-random")
    assert set(PRESET_NAMES) == {"demo", "sd-mini", "sd15-random"}
