"""Shared-noise denoising errors: reference without gradient, only LoRA parameters trained."""

import torch

from prefalign.config import LoraConfig
from prefalign.losses.diffusion import diffusion_dpo_loss
from prefalign.models.diffusion import add_lora, make_scheduler
from prefalign.training.denoise import keyed_timesteps_and_noise, pair_denoising_errors


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def test_keyed_draws_do_not_depend_on_batch_composition():
    t_all, noise_all = keyed_timesteps_and_noise([0, 1, 2, 3], seed=7, purpose="dpo", shape=(4, 8, 8))
    t_two, noise_two = keyed_timesteps_and_noise([2, 3], seed=7, purpose="dpo", shape=(4, 8, 8))
    assert torch.equal(t_all[2:], t_two) and torch.equal(noise_all[2:], noise_two)
    t_other, _ = keyed_timesteps_and_noise([0, 1, 2, 3], seed=8, purpose="dpo", shape=(4, 8, 8))
    assert not torch.equal(t_all, t_other)


def test_reference_errors_carry_no_gradient_and_only_lora_is_trained():
    unet = tiny_unet()
    add_lora(unet, LoraConfig(rank=2, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0")))
    # gaussian init makes LoRA B zero: perturb it so the adapter changes the output
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lat_w, lat_l, cond = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    t, noise = keyed_timesteps_and_noise([0, 1, 2], seed=0, purpose="dpo", shape=(4, 8, 8))
    err_w, err_l, ref_err_w, ref_err_l = pair_denoising_errors(unet, make_scheduler(), lat_w, lat_l, cond, t, noise)
    assert err_w.requires_grad and err_l.requires_grad
    assert not ref_err_w.requires_grad and not ref_err_l.requires_grad
    assert not torch.allclose(err_w, ref_err_w), "adapters must be off for the reference only"
    diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=100.0).mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_winner_and_loser_share_noise_and_timestep():
    unet = tiny_unet()
    add_lora(unet, LoraConfig(rank=2, alpha=2.0, targets=("to_q",)))
    lat = torch.randn(2, 4, 8, 8)
    t, noise = keyed_timesteps_and_noise([5, 6], seed=0, purpose="dpo", shape=(4, 8, 8))
    # identical winner and loser latents: shared (t, noise) makes their errors identical
    err_w, err_l, ref_w, ref_l = pair_denoising_errors(
        unet, make_scheduler(), lat, lat.clone(), torch.randn(2, 5, 16), t, noise
    )
    torch.testing.assert_close(err_w, err_l)
    torch.testing.assert_close(ref_w, ref_l)


def test_lora_target_that_matches_nothing_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="to_nothing"):
        add_lora(tiny_unet(), LoraConfig(targets=("to_q", "to_nothing")))


class ForwardOnly(torch.nn.Module):
    """Stands in for DistributedDataParallel: forwards calls, has no ``disable_adapters``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrapped_policy_forward_keeps_the_reference_gradient_free_and_trains_only_lora():
    from prefalign.losses.diffusion import diffusion_dro_loss
    from prefalign.training.denoise import policy_and_reference_errors

    unet = tiny_unet()
    add_lora(unet, LoraConfig(rank=2, alpha=2.0, targets=("to_q", "to_v", "conv1")))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    # DRO's layout: experts then policy states in one forward
    noisy, t, cond, target = (
        torch.randn(4, 4, 8, 8),
        torch.tensor([10, 500, 10, 500]),
        torch.randn(4, 5, 16),
        torch.randn(4, 4, 8, 8),
    )
    err, ref_err = policy_and_reference_errors(ForwardOnly(unet), unet, noisy, t, cond, target)
    assert err.requires_grad and not ref_err.requires_grad
    assert not torch.allclose(err, ref_err)
    diffusion_dro_loss(err[:2], ref_err[:2], err[2:], ref_err[2:], margin=1.0).mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("conv1" in n for n in with_grad)


def test_saved_lora_loads_back_completely_with_the_diffusers_loader(tmp_path):
    """Every adapter, attention and conv alike, comes back through ``load_lora_weights``' unet loader."""
    from diffusers import StableDiffusionPipeline

    from prefalign.models.diffusion import save_lora

    trained = tiny_unet()
    add_lora(trained, LoraConfig(rank=2, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(trained, tmp_path)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    fresh = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=fresh)
    loaded = {n.replace(".default_0", ".default"): p for n, p in fresh.named_parameters() if "lora_" in n}
    expected = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_timestep_min_bounds_the_draw_and_zero_keeps_the_published_draw():
    from prefalign.training.denoise import keyed_timesteps_and_noise

    ids = list(range(200))
    t0, noise0 = keyed_timesteps_and_noise(ids, seed=3, purpose="dpo", shape=(4, 2, 2))
    t_default, noise_default = keyed_timesteps_and_noise(ids, seed=3, purpose="dpo", shape=(4, 2, 2), timestep_min=0)
    assert torch.equal(t0, t_default) and torch.equal(noise0, noise_default)
    high, _ = keyed_timesteps_and_noise(ids, seed=3, purpose="dpo", shape=(4, 2, 2), timestep_min=500)
    assert int(high.min()) >= 500 and int(high.max()) <= 999
    assert int(t0.min()) < 500  # the uniform draw does reach below
