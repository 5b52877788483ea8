"""The policy trainer in-process: only LoRA trains, exact resume, refusals before training, keyed sharding."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefalign.config import DPOConfig, load_config
from prefalign.training.checkpoints import CheckpointMismatchError, complete_checkpoints
from prefalign.training.policy import sampler_grid, shard_sample_ids, train_dpo, train_dro, train_kto

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("policy_job", ROOT / "tests/integration/policy_job.py")
policy_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(policy_job)


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on shared cores spin-wait each other: these tiny models run far faster on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg(tiny_overrides):
    def make(**extra):
        overrides = {
            **tiny_overrides,
            "trainer.lora.rank": 2,
            "dpo.steps": 3,
            "dro.steps": 4,
            "trainer.checkpoint_every": 1,
            **extra,
        }
        return load_config(ROOT / "params.yaml", overrides)

    return make


def run_dpo(cfg, checkpoints=None):
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    unet = policy_job.tiny_unet(cfg)
    winners, losers = [shas[i % 10] for i in range(12)], [shas[(3 * i + 1) % 10] for i in range(12)]
    history = train_dpo(
        unet,
        winners,
        losers,
        [prompts[i % 5] for i in range(12)],
        feats,
        cfg.dpo,
        seed=cfg.seed,
        checkpoint_dir=checkpoints,
    )
    return unet, history


def run_dro(cfg, checkpoints=None):
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    unet = policy_job.tiny_unet(cfg)
    history = train_dro(
        unet, shas[:8], [prompts[i % 5] for i in range(8)], feats, cfg.dro, seed=cfg.seed, checkpoint_dir=checkpoints
    )
    return unet, history


def run_kto(cfg, checkpoints=None, desirable=None):
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    unet = policy_job.tiny_unet(cfg)
    flags = desirable if desirable is not None else [i % 3 != 0 for i in range(10)]
    judged = [prompts[i % 5] for i in range(10)]
    history = train_kto(unet, shas, judged, flags, feats, cfg.kto, seed=cfg.seed, checkpoint_dir=checkpoints)
    return unet, history


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def test_only_lora_parameters_change(tiny_cfg):
    cfg = tiny_cfg(**{"trainer.checkpoint_every": 0})
    base = {n: p.detach().clone() for n, p in policy_job.tiny_unet(cfg).named_parameters()}
    unet, history = run_dpo(cfg)
    assert history.steps == 3 and all(np.isfinite(history.metrics["loss"]))
    params = dict(unet.named_parameters())
    for name, before in base.items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        after = params.get(name, params.get(peft_name))
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
    assert any(p.abs().sum() > 0 for n, p in lora_state(unet).items() if "lora_B" in n), "LoRA B never moved"


def keep_only(checkpoints: Path, step: int) -> None:
    for done, folder in complete_checkpoints(checkpoints):
        if done > step:
            shutil.rmtree(folder)


def test_dpo_resume_is_exact(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    full, full_history = run_dpo(cfg, tmp_path / "ck")
    keep_only(tmp_path / "ck", 1)
    resumed, resumed_history = run_dpo(cfg, tmp_path / "ck")
    for name, value in lora_state(full).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)
    assert resumed_history.metrics == full_history.metrics


def test_dro_resume_mid_round_is_exact(tiny_cfg, tmp_path):
    # step 3 of reuse 2 is mid-round: the recorded trajectories, the lagged sampler copy and the EMA
    # must all come back from the checkpoint
    cfg = tiny_cfg(
        **{"dro.reuse": 2, "dro.sync_every": 2, "dro.ema_decay": 0.5, "dro.timestep_jitter": 40, "dro.batch_size": 3}
    )
    full, _ = run_dro(cfg, tmp_path / "ck")
    keep_only(tmp_path / "ck", 3)
    resumed, history = run_dro(cfg, tmp_path / "ck")
    assert history.steps == 4
    for name, value in lora_state(full).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)


def test_checkpoint_folder_of_another_config_is_refused_before_training(tiny_cfg, tmp_path):
    run_dpo(tiny_cfg(), tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    other = tiny_cfg(**{"dpo.beta": 100.0})
    with pytest.raises(CheckpointMismatchError, match=r"(?s)ck.*training config.*[Dd]elete.*paths\.checkpoints"):
        run_dpo(other, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    # a setting that does not change the result may differ on resume
    run_dpo(tiny_cfg(**{"trainer.checkpoint_every": 3}), tmp_path / "ck")


def test_lora_target_matching_nothing_is_refused_naming_it(tiny_cfg):
    cfg = tiny_cfg(**{"trainer.lora.targets": ["to_q", "to_qq"], "trainer.checkpoint_every": 0})
    with pytest.raises(ValueError, match="to_qq"):
        run_dpo(cfg)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_beta_is_refused_by_the_config(beta):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="beta"):
        DPOConfig(beta=beta)


@pytest.mark.parametrize(("processes", "accum"), [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_shards_partition_each_step_whatever_the_process_count(processes, accum):
    batch = 8 // (processes * accum)
    for step in range(3):
        ids = [
            shard_sample_ids(step, micro, batch_size=batch, grad_accum=accum, process_index=p, num_processes=processes)
            for micro in range(accum)
            for p in range(processes)
        ]
        assert sorted(np.concatenate(ids).tolist()) == list(range(8 * step, 8 * step + 8))


def test_sampler_grid_offsets_are_keyed_bounded_and_decreasing():
    assert sampler_grid(10, 0, seed=0, round_id=3) is None
    plain = sampler_grid(10, 1000, seed=0, round_id=0)  # huge jitter: clipping must keep a valid grid
    assert plain == sorted(set(plain), reverse=True) and 0 <= min(plain) and max(plain) <= 999
    grids = [sampler_grid(10, 30, seed=0, round_id=r) for r in range(8)]
    assert grids[2] == sampler_grid(10, 30, seed=0, round_id=2)
    assert len({tuple(g) for g in grids}) > 1
    from prefalign.models.diffusion import make_scheduler

    solver = make_scheduler("dpmsolver++")
    solver.set_timesteps(10)
    base = solver.timesteps.numpy()
    for grid in grids:
        if len(grid) == len(base):
            assert np.all(np.abs(np.array(grid) - base) <= 30)


def test_gradient_checkpointing_changes_nothing_and_adafactor_trains(tiny_cfg):
    plain, _ = run_dpo(tiny_cfg(**{"trainer.checkpoint_every": 0, "dpo.steps": 2}))
    # bf16 asks for CUDA; on CPU the trainer keeps float32, so the weights must match the plain run
    recomputed, _ = run_dpo(
        tiny_cfg(
            **{
                "trainer.checkpoint_every": 0,
                "dpo.steps": 2,
                "trainer.gradient_checkpointing": True,
                "trainer.mixed_precision": "bf16" if not torch.cuda.is_available() else "no",
            }
        )
    )
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(lora_state(recomputed)[name], value, rtol=1e-6, atol=1e-8)
    adafactor_cfg = tiny_cfg(**{"trainer.checkpoint_every": 0, "dpo.steps": 2, "trainer.optimizer": "adafactor"})
    adafactor, history = run_dpo(adafactor_cfg)
    assert all(np.isfinite(history.metrics["loss"]))
    assert any(p.abs().sum() > 0 for n, p in lora_state(adafactor).items() if "lora_B" in n)


def test_dro_current_policy_target_equals_the_published_on_policy_update(tiny_cfg):
    """With fresh trajectories every update (reuse 1, sync 1) the recorded ε_pol is ε_φ(x_t) itself, so the
    cheaper "current" target (no gradient through the policy half) must train the same adapter."""
    common = {"dro.reuse": 1, "dro.sync_every": 1, "dro.batch_size": 3, "trainer.checkpoint_every": 0}
    recorded, recorded_history = run_dro(tiny_cfg(**common, **{"dro.policy_target": "recorded"}))
    current, current_history = run_dro(tiny_cfg(**common, **{"dro.policy_target": "current"}))
    assert max(abs(v) for v in current_history.metrics["err_policy"]) == 0.0
    assert max(abs(v) for v in recorded_history.metrics["err_policy"]) < 1e-10  # ε_φ(x_t) = ε_pol, up to rounding
    np.testing.assert_allclose(current_history.metrics["loss"], recorded_history.metrics["loss"], rtol=1e-4)
    for name, value in lora_state(recorded).items():
        # Adam turns a gradient that is ~0 in both runs into a ±lr step of either sign, so an element may
        # differ by a fraction of one step (lr 5e-4): far below what a different update would give.
        torch.testing.assert_close(lora_state(current)[name], value, rtol=1e-3, atol=1e-5, msg=name)
    assert any(p.abs().sum() > 0 for n, p in lora_state(current).items() if "lora_B" in n)


def test_kto_trains_on_binary_feedback_and_resumes_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"kto.steps": 3, "kto.batch_size": 4, "kto.warmup_steps": 0})
    full, history = run_kto(cfg, tmp_path / "ck")
    assert history.steps == 3 and all(np.isfinite(history.metrics["loss"]))
    assert all(0.0 <= v <= 1.0 for v in history.metrics["loss"])  # KTO's per-sample loss is 1 - sigmoid
    assert any(p.abs().sum() > 0 for n, p in lora_state(full).items() if "lora_B" in n)
    keep_only(tmp_path / "ck", 1)
    resumed, _ = run_kto(cfg, tmp_path / "ck")
    for name, value in lora_state(full).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)


def test_kto_refuses_feedback_of_one_kind(tiny_cfg):
    with pytest.raises(ValueError, match="desirable and undesirable"):
        run_kto(tiny_cfg(), desirable=[True] * 10)
