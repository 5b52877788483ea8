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


# --------------------------------------------------------------------------------------------------
# The step's efficiency: no host reads between log steps, prefetched inputs, GPU-only switches, compile.
# --------------------------------------------------------------------------------------------------


def test_prompt_dropout_drops_the_samples_of_the_per_sample_draw():
    from prefalign.seeding import keyed_generator
    from prefalign.training.policy import drop_prompts

    ids = np.arange(40, 240)
    uniforms = [torch.rand(1, generator=keyed_generator(5, "prompt-dropout", int(i))).item() for i in ids]
    # A rate a hair above one sample's draw: float32 would round it down onto the draw and keep the prompt.
    hair_above = uniforms[7] + 2.0**-40
    assert np.float32(hair_above) == np.float32(uniforms[7])
    for rate in (0.3, 0.999, hair_above):
        rows = drop_prompts(torch.arange(len(ids)), ids, rate, -1, seed=5)
        expected = [-1 if u < rate else k for k, u in enumerate(uniforms)]
        assert rows.tolist() == expected, rate
    assert (drop_prompts(torch.arange(len(ids)), ids, hair_above, -1, seed=5)[7] == -1).item()


def test_history_and_logs_do_not_depend_on_when_metrics_are_read(tiny_cfg):
    """Metrics read back every step or every 4th (and at checkpoints): the same history, logged at the same steps."""
    cfg = tiny_cfg(**{"trainer.checkpoint_every": 0, "dpo.steps": 5, "dpo.grad_accum": 2, "dpo.batch_size": 2})
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    winners, losers = [shas[i % 10] for i in range(12)], [shas[(3 * i + 1) % 10] for i in range(12)]
    runs = {}
    for every in (1, 4):
        logged = []
        history = train_dpo(
            policy_job.tiny_unet(cfg),
            winners,
            losers,
            [prompts[i % 5] for i in range(12)],
            feats,
            cfg.dpo,
            seed=cfg.seed,
            log_every=every,
            log_metrics=lambda metrics, step, logged=logged: logged.append((step, metrics)),
        )
        runs[every] = (history, logged)
    (every_step, logged_1), (every_4th, logged_4) = runs[1], runs[4]
    assert every_step.steps == every_4th.steps == 5
    assert every_4th.metrics == every_step.metrics
    assert list(every_4th.metrics) == [
        "implicit_acc",
        "loss",
        "model_err",
        "ref_err",
        "reward_margin",
        "grad_norm",
        "lr",
    ]
    assert [step for step, _ in logged_1] == list(range(5)) and [step for step, _ in logged_4] == [0, 4]
    for step, metrics in logged_4:
        assert metrics == {f"train/{k}": v[step] for k, v in every_step.metrics.items()}


class ValueReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values per trainer step on this thread, outside the optimizer's own step (the
    for-loop AdamW reads its host-side step counters; fused AdamW, used on CUDA, does not)."""

    def __init__(self, policy_module):
        super().__init__()
        self.reads = {
            getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
        }
        self.per_step: dict[int, int] = {}
        self.step, self.in_optimizer = -1, False
        self._policy, self._progress = policy_module, policy_module._progress

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.reads and self.step >= 0 and not self.in_optimizer:
            self.per_step[self.step] = self.per_step.get(self.step, 0) + 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        def tracked(run, total, desc):
            for step in self._progress(run, total, desc):
                self.step = step
                self.per_step.setdefault(step, 0)
                yield step
            self.step = -1

        def entering(*_):
            self.in_optimizer = True

        def leaving(*_):
            self.in_optimizer = False

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._policy._progress = tracked
        self._hooks = [
            register_optimizer_step_pre_hook(entering),
            register_optimizer_step_post_hook(leaving),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        self._policy._progress = self._progress
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_steps_between_log_steps_read_no_tensor_value(tiny_cfg, method):
    """The host waits for the device only where the metrics are read back: at log steps (and checkpoints)."""
    from prefalign.training import policy

    cfg = tiny_cfg(**{"trainer.checkpoint_every": 0, f"{method}.steps": 5, f"{method}.grad_accum": 2})
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    with ValueReads(policy) as reads:
        if method == "dpo":
            winners, losers = [shas[i % 10] for i in range(12)], [shas[(3 * i + 1) % 10] for i in range(12)]
            train_dpo(
                policy_job.tiny_unet(cfg), winners, losers, prompts * 3, feats, cfg.dpo, seed=cfg.seed, log_every=3
            )
        else:
            flags = [i % 3 != 0 for i in range(10)]
            train_kto(policy_job.tiny_unet(cfg), shas, prompts * 2, flags, feats, cfg.kto, seed=cfg.seed, log_every=3)
    assert sorted(reads.per_step) == list(range(5))
    # one read-back per log step; the last one (after step 4) happens after the loop
    assert {step: n for step, n in reads.per_step.items() if n} == {0: 1, 3: 1}


def test_prefetcher_prepares_the_next_step_on_a_worker_in_order():
    import threading

    from prefalign.training.policy import StepPrefetcher

    calls = []

    def prepare(step):
        calls.append((step, threading.current_thread().name))
        if step == 3:
            raise RuntimeError("draw failed at step 3")
        return step * 10

    with StepPrefetcher(prepare, range(4)) as prefetch:
        assert [prefetch.get(step) for step in (0, 1, 2)] == [0, 10, 20]
        with pytest.raises(RuntimeError, match="step 3"):
            prefetch.get(3)  # prepared on the worker while step 2 ran; its error reaches the caller
    assert [step for step, _ in calls] == [0, 1, 2, 3]
    assert all(name.startswith("prefalign-inputs") for _, name in calls)


def test_gpu_storage_of_frozen_weights_keeps_lora_float32_and_restores_exactly(tiny_cfg):
    from prefalign.models.diffusion import add_lora
    from prefalign.training.harness import restore_frozen_weights, store_frozen_weights

    cfg = tiny_cfg()
    unet = policy_job.tiny_unet(cfg)
    add_lora(unet, cfg.trainer.lora)
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    frozen = store_frozen_weights(unet, dtype=torch.bfloat16, channels_last=True)
    params = dict(unet.named_parameters())
    assert {params[n].dtype for n in params if params[n].requires_grad} == {torch.float32}
    assert {params[n].dtype for n in params if not params[n].requires_grad} == {torch.bfloat16}
    assert all(params[n].is_contiguous() for n in params if params[n].requires_grad)
    assert frozen.channels_last and all(
        params[n].is_contiguous(memory_format=torch.channels_last) for n in frozen.channels_last
    )
    # what autocast does on a GPU: bf16 matmuls over bf16 base weights, float32 adapter gradients
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 8, cfg.model.text_hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([10, 900]), encoder_hidden_states=cond).sample
    out.float().pow(2).mean().backward()
    assert {p.grad.dtype for p in params.values() if p.grad is not None} == {torch.float32}
    restore_frozen_weights(unet, frozen)
    for name, param in unet.named_parameters():
        assert param.dtype == before[name].dtype and param.is_contiguous(), name
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow  # dynamo traces the tiny UNet twice: 7-20 s on a shared CPU
def test_compiled_unet_compiles_policy_and_reference_once_then_never_again(tiny_cfg):
    """The reference pass flips the adapters off on the same compiled UNet: two graphs, picked by their guards,
    no recompilation in later steps (a counting backend needs no C++ compiler)."""
    from torch._dynamo.testing import CompileCounter

    from prefalign.training.harness import compile_module
    from prefalign.training.policy import DPOStep, PairData, start_policy_run

    torch._dynamo.reset()
    cfg = tiny_cfg(**{"trainer.checkpoint_every": 0, "dpo.batch_size": 2})
    feats, shas, prompts = policy_job.synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    run = start_policy_run(
        policy_job.tiny_unet(cfg), cfg.dpo, seed=cfg.seed, purpose="dpo", data_sha="test", checkpoint_dir=None
    )
    counter = CompileCounter()
    compile_module(run.model, backend=counter)
    run.compiled = True
    data = PairData(
        feats, feats.latent_rows(shas[:6]), feats.latent_rows(shas[4:]), feats.text_rows(prompts + prompts[:1])
    )
    compiled_after = []
    with DPOStep(run, data, cfg.dpo, seed=cfg.seed, steps=range(4)) as step:
        for index in range(4):
            outcome = step(index)
            compiled_after.append(counter.frame_count)
    assert torch.isfinite(outcome.sums.total).all()
    assert compiled_after == [2, 2, 2, 2]
    run.finish()  # eager again: another call compiles nothing
    with torch.no_grad():
        run.model(torch.randn(1, 4, 8, 8), torch.tensor([3]), encoder_hidden_states=feats.text[:1])
    assert counter.frame_count == 2
    torch._dynamo.reset()
