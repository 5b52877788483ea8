"""Test-wide settings: offline, no telemetry, deterministic CPU threads; a tiny pipeline config."""

import os

from prefalign.runtime import apply_offline_defaults

apply_offline_defaults()
os.environ.setdefault("PREFALIGN_ANNOTATOR_KEY", "test-key-not-secret")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


TINY_OVERRIDES = {
    "world.n_pretrain_images": 256,
    "pretrain.vae_steps": 4,
    "pretrain.unet_steps": 4,
    "pretrain.batch_size": 16,
    "data.pool_prompts": 48,
    "data.pool_base_samples": 2,
    "data.pool_renderings": 2,
    "data.pool_pairs_per_prompt": 4,
    "data.pool_sample_steps": 2,
    "validation.min_pairs": 20,
    "model.unet_channels": [32, 64],
    "model.vae_channels": [32, 32],
    "model.text_hidden": 32,
    "reward.steps": 4,
    "reward.pretrain_steps": 4,
    "reward.tiny_width": 32,
    "reward.tiny_vision_layers": 2,
    "reward.pretrain_batch_size": 16,
    "reward.batch_size": 16,
    "reward.eval_every": 2,
    "dpo.steps": 3,
    "dpo.batch_size": 4,
    "trainer.checkpoint_every": 1,
    "dro.steps": 2,
    "dro.batch_size": 4,
    "dro.reuse": 1,
    "dro.sample_steps": 2,
    "dro.top_k": 16,
    "eval.n_prompts": 4,
    "eval.images_per_prompt": 2,
    "eval.grid_prompts": 4,
    "eval.sample_steps": 2,
    "eval.bootstrap": 50,
}


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    return dict(TINY_OVERRIDES)
