"""Profiles for ``prefalign init``: a whole, commented ``params.yaml`` from a named set of overrides.

There is one config system. A profile is a set of dotted overrides of the ``PipelineConfig`` schema; ``init``
validates them, then writes every key of the schema with its value and a comment: the profile's reason for
a value it sets (where the value was published), the field's description for one it leaves at the default.
A value nobody chose is therefore visible as such in the file, instead of a demo value carried silently
into a Stable Diffusion run.

* ``demo``: no overrides, so exactly the values of the committed ``params.yaml`` (the schema defaults).
* ``sd15``: Stable Diffusion 1.5 at 512 px on Pick-a-Pic, with the published settings of Diffusion-DPO
  (Wallace et al. 2024), Diffusion-DRO (Wu et al. 2025) and PickScore (Kirstain et al. 2023). Its local
  folders are placeholders, named at the top of the written file; stages fail naming the key until they exist.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from prefalign.config import POLICY_METHODS, TRAINER_FIELDS, PipelineConfig


class ProfileError(ValueError):
    """An unknown profile, or a params file that ``init`` will not overwrite."""


@dataclass(frozen=True)
class Setting:
    """One value a profile sets, and where it comes from (written as the key's comment)."""

    value: Any
    source: str


@dataclass(frozen=True)
class Profile:
    summary: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    # Keys whose value is a placeholder the user must replace (a local folder), with what to put there.
    placeholders: Mapping[str, str] = field(default_factory=dict)


DEMO = Profile(summary="The demo world on CPU: every value is the schema default, as in the committed params.yaml.")

# Sources, named in each comment that uses them so that the written file stands on its own.
_DPO_PAPER = "Wallace et al. 2024 (Diffusion-DPO)"
_DPO_EXAMPLE = "diffusers Diffusion-DPO LoRA example (SD1.5 command)"
_DRO_PAPER = "Wu et al. 2025 (Diffusion-DRO code)"
_PICKSCORE = "Kirstain et al. 2023 (PickScore)"

SD15 = Profile(
    summary="Stable Diffusion 1.5 at 512 px on Pick-a-Pic v2, one GPU (bf16): published settings, each "
    "with its source.",
    placeholders={
        "model.pretrained_path": "your local SD1.5 diffusers folder (stable-diffusion-v1-5/stable-diffusion-v1-5)",
        "reward.backbone": "a local CLIP folder (PickScore starts from laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
        "eval.judges.pickscore.path": "a local PickScore_v1 folder (yuvalkirstain/PickScore_v1)",
        "paths.source": "the Pick-a-Pic v2 parquet shards (or run `prefalign data import`)",
    },
    settings={
        "data.source": Setting("pickapic", "Pick-a-Pic v2 parquet shards in paths.source (docs/data_formats.md)"),
        "featurize.batch_size": Setting(64, "512 px images per VAE forward on one GPU (the demo's 256 are 16 px)"),
        "featurize.num_workers": Setting(8, "decoding and resizing 512-1024 px JPEGs would starve the GPU in-process"),
        "model.preset": Setting("sd15", "a local SD1.x diffusers folder, used in place"),
        "model.pretrained_path": Setting(
            "models/sd15",
            "PLACEHOLDER, relative to this file: point it at your local SD1.5 diffusers folder; pretrain_base "
            "fails naming this key until the folder exists",
        ),
        "model.resolution": Setting(
            512, "SD1.5's trained size (unet sample_size 64 x VAE factor 8); pretrain_base checks it on the folder"
        ),
        "reward.backbone": Setting(
            "models/clip-vit-h-14",
            "PLACEHOLDER: a local CLIP folder; PickScore fine-tunes laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        ),
        "reward.lr": Setting(
            3e-6,
            f"{_PICKSCORE}: AdamW 3e-6 on the whole CLIP-H (its repository's optimizer default is 1e-6; HPSv2 "
            "uses 3.3e-6 with most layers frozen). Warmup: 5% of the steps here (200), PickScore 500",
        ),
        "reward.batch_size": Setting(
            128, f"{_PICKSCORE}: 128 pairs per step (16 per GPU x 8 GPUs); here per process, on one GPU"
        ),
        "reward.steps": Setting(4000, f"{_PICKSCORE}: 4000 steps"),
        "reward.mixed_precision": Setting("bf16", f"{_PICKSCORE} trains in bf16 (its accelerator config)"),
        "reward.gradient_checkpointing": Setting(
            True, "128 pairs of 224 px through CLIP-H on one GPU: PickScore held 16 per GPU, 8x fewer activations"
        ),
        "reward.num_workers": Setting(8, "decoding 512-1024 px JPEGs for the reward model, as for featurize"),
        "trainer.lora.rank": Setting(8, f"{_DPO_EXAMPLE}: --rank=8"),
        "trainer.lora.alpha": Setting(8.0, "the diffusers DPO example sets lora_alpha = rank"),
        "trainer.lora.targets": Setting(
            ["to_q", "to_k", "to_v", "to_out.0"],
            "the diffusers DPO example's attention-only adapter, which its learning rate was run with (the demo "
            "adds conv1, conv2)",
        ),
        "trainer.optimizer": Setting("adamw", f"{_DPO_PAPER}: AdamW for SD1.5"),
        "trainer.mixed_precision": Setting(
            "bf16", "Diffusion-DRO trains in bf16; the DPO example's fp16 needs loss scaling that bf16 does not"
        ),
        "trainer.compile": Setting(True, "torch.compile on CUDA: thousands of same-shape UNet steps repay it"),
        "trainer.gradient_checkpointing": Setting(
            False, "off for speed; turn on if the micro-batches below do not fit (the DPO example runs with it on)"
        ),
        "trainer.checkpoint_every": Setting(500, f"{_DPO_PAPER} SD1.5 launcher: a checkpoint every 500 steps"),
        "dpo.beta": Setting(
            2000.0,
            f"{_DPO_PAPER}, Sec. 5.1: SD1.5 at β 2000 (2000-5000 works). Our β is the original code's; "
            "diffusers' --beta_dpo is β/2 (docs/design.md)",
        ),
        "dpo.variant": Setting("sigmoid", f"{_DPO_PAPER}: the sigmoid loss"),
        "dpo.lr": Setting(
            1e-5,
            "diffusers examples/research_projects/diffusion_dpo/README.md, SD1.5 command: --learning_rate=1e-5 "
            "with --rank=8 and 32 pairs per step, the published LoRA rate. "
            "The paper's (2000/β)·2.048e-8 is for the full UNet at 2048 pairs per step and does not carry over "
            "to a LoRA adapter starting near zero. The example ran at its default --beta_dpo 2500 (our 5000): "
            "at β 2000 its steps are up to 2.5x smaller, so raise lr before raising β if DPO moves too little",
        ),
        "dpo.steps": Setting(10000, f"{_DPO_EXAMPLE}: --max_train_steps=10000 (320k pairs)"),
        "dpo.batch_size": Setting(16, f"{_DPO_EXAMPLE}: --train_batch_size=16 pairs per micro-batch per process"),
        "dpo.grad_accum": Setting(
            2,
            f"{_DPO_EXAMPLE}: --gradient_accumulation_steps=2. Effective batch = batch_size x grad_accum x "
            "processes = 16 x 2 x 1 = 32 pairs on one GPU (the paper: 2048 on 16 GPUs)",
        ),
        "dpo.warmup_steps": Setting(0, f"{_DPO_EXAMPLE}: --lr_scheduler=constant --lr_warmup_steps=0"),
        "dpo.prompt_dropout": Setting(
            0.2, f"{_DPO_PAPER} code: --proportion_empty_prompts 0.2, added for SD1.5 (keeps guidance working)"
        ),
        "dpo.timestep_min": Setting(0, f"{_DPO_PAPER}: t ~ U{{0..999}}, the published uniform draw (demo: 700)"),
        "dro.init_from": Setting(
            "base", "Wu et al. 2025 fine-tune SD1.5 itself; dpo would stack DRO on the DPO result (the demo's hybrid)"
        ),
        "dro.top_k": Setting(500, f"{_DRO_PAPER}: the top K = 500 images by the reward model are the experts"),
        "dro.margin": Setting(0.001, f"{_DRO_PAPER}: margin 0.001"),
        "dro.lr": Setting(1e-4, f"{_DRO_PAPER}: AdamW 1e-4, constant (there on the full UNet, here on the adapter)"),
        "dro.steps": Setting(1600, f"{_DRO_PAPER}: 25,600 micro-steps = 1600 optimizer updates"),
        "dro.batch_size": Setting(16, f"{_DRO_PAPER}: 256 samples per update (4 per GPU x 16 accumulation x 4 GPUs)"),
        "dro.grad_accum": Setting(
            16,
            "effective batch = batch_size x grad_accum x processes = 16 x 16 x 1 = 256 on one GPU, as published; "
            "with N processes divide grad_accum by N",
        ),
        "dro.warmup_steps": Setting(0, f"{_DRO_PAPER}: no warmup"),
        "dro.sample_steps": Setting(20, f"{_DRO_PAPER}: online samples by DPM-Solver++ in 20 steps"),
        "dro.guidance": Setting(1.0, f"{_DRO_PAPER}: no CFG in the online sampler"),
        "dro.reuse": Setting(1, f"{_DRO_PAPER}: the trajectory buffer is refilled every micro-step"),
        "dro.sync_every": Setting(1, f"{_DRO_PAPER}: the sampler copy re-syncs every update (M = 1)"),
        "dro.policy_target": Setting("current", f"{_DRO_PAPER}: with M = 1 the policy target is the current ε"),
        "dro.prompt_dropout": Setting(0.2, f"{_DRO_PAPER}: prompt dropout 0.2"),
        "dro.timestep_jitter": Setting(
            25, f"{_DRO_PAPER}: the 20-step grid (spacing 50) shifted by U[0, 50); ±25 covers every t alike"
        ),
        "dro.ema_decay": Setting(0.9999, f"{_DRO_PAPER}: EMA 0.9999 over 1600 updates, the EMA weights exported"),
        "kto.timestep_min": Setting(0, "the published uniform draw, as dpo (kto is not a pipeline stage)"),
        "eval.n_prompts": Setting(500, "Wu et al. 2025 evaluate on Pick-a-Pic v2 test_unique: 500 prompts"),
        "eval.images_per_prompt": Setting(5, "Wu et al. 2025: 5 images per prompt"),
        "eval.sample_steps": Setting(
            50, "Wu et al. 2025: 50 steps (their DDPM sampler; ours is the base folder's scheduler)"
        ),
        "eval.guidance": Setting(7.5, "Wu et al. 2025: CFG 7.5"),
        "eval.batch_size": Setting(40, "512 px with CFG: 80 UNet rows per call, a few GB of activations in bf16"),
        "eval.judges": Setting(
            {"pickscore": {"kind": "pickscore", "path": "models/pickscore"}},
            "PLACEHOLDER path: a local PickScore_v1 folder, a judge that did not choose DRO's experts",
        ),
        "eval.judge": Setting(
            "pickscore", "promotion by a judge independent of the reward model (there is no oracle on real data)"
        ),
    },
)

PROFILES: dict[str, Profile] = {"demo": DEMO, "sd15": SD15}


def get_profile(name: str) -> Profile:
    """The named profile.

    Raises:
        ProfileError: an unknown name (the message lists the known ones).
    """
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def _nested(settings: Mapping[str, Setting]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, setting in settings.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = setting.value
    return tree


def profile_config(name: str) -> PipelineConfig:
    """The profile's overrides validated against the schema, exactly as ``load_config`` would.

    Raises:
        ProfileError: the profile is unknown, or sets a key the schema no longer has or a value it refuses.
    """
    try:
        return PipelineConfig.model_validate(_nested(get_profile(name).settings))
    except ValidationError as err:
        raise ProfileError(f"profile {name!r} does not fit the config schema:\n{err}") from None


def _yaml_value(value: Any) -> str:
    """One value as inline YAML: quoted where YAML would misread it (``'no'``), lists and maps in flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


COMMENT_COLUMN = 40
LINE_WIDTH = 119


def _keyed_line(indent: str, key: str, value: str | None, comment: str) -> list[str]:
    """``key: value  # comment`` on one line, or the comment wrapped above the key when it is long."""
    line = f"{indent}{key}:" + (f" {value}" if value is not None else "")
    single = f"{line:<{COMMENT_COLUMN - 1}} # {comment}"
    if len(single) <= LINE_WIDTH:
        return [single]
    wrapped = textwrap.wrap(comment, width=LINE_WIDTH - len(indent) - 2, break_on_hyphens=False)
    return [f"{indent}# {part}" for part in wrapped] + [line]


def _skipped(dotted: str, cfg: PipelineConfig) -> str | None:
    """Why a key is not written (it must not be), or None when it is."""
    section, _, key = dotted.partition(".")
    if dotted == "paths.root":
        return "root: the folder of this file (load_config sets it)"
    if section in POLICY_METHODS and key in TRAINER_FIELDS:
        return "shared"  # set once under trainer: the loader refuses it in a method section
    if dotted == "model.resolution" and cfg.model.preset == "demo":
        return "resolution: follows world.image_size on the demo preset"
    return None


def _section_lines(
    model: BaseModel, values: Mapping[str, Any], prefix: str, indent: str, profile: Profile, cfg: PipelineConfig
) -> list[str]:
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        dotted = f"{prefix}{name}"
        if (why := _skipped(dotted, cfg)) is not None:
            if why != "shared":
                lines.append(f"{indent}# {why}")
            continue
        setting = profile.settings.get(dotted)
        child = getattr(model, name)
        if isinstance(child, BaseModel):
            doc = (type(child).__doc__ or "").strip().splitlines()[0]
            lines += _keyed_line(indent, name, None, setting.source if setting else doc)
            lines += _section_lines(child, values[name], f"{dotted}.", indent + "  ", profile, cfg)
            continue
        comment = setting.source if setting else (info.description or "")
        lines += _keyed_line(indent, name, _yaml_value(values[name]), comment)
    return lines


def render_profile(name: str) -> str:
    """The full, commented ``params.yaml`` of a profile (validated first)."""
    profile = get_profile(name)
    cfg = profile_config(name)
    values = cfg.model_dump(mode="json")
    header = [
        f"# prefalign: the one config, written by `prefalign init --profile {name}`.",
        f"# {profile.summary}",
        "# Every section is a pydantic model in src/prefalign/config.py: unknown keys, wrong types and",
        "# out-of-range values fail at load, naming the key. A comment gives the source of a value the",
        "# profile sets, or the key's description where the schema default stands.",
        "# Override for one run: `dvc exp run -S dpo.beta=5000` (keeps dvc.lock truthful).",
    ]
    if profile.placeholders:
        header.append("# Set before the first run (placeholders):")
        header += [f"#   {key}: {what}" for key, what in profile.placeholders.items()]
    body: list[str] = []
    for section, info in PipelineConfig.model_fields.items():
        child = getattr(cfg, section)
        setting = profile.settings.get(section)
        if isinstance(child, BaseModel):
            doc = (type(child).__doc__ or "").strip().splitlines()[0]
            body += ["", *_keyed_line("", section, None, doc)]
            body += _section_lines(child, values[section], f"{section}.", "  ", profile, cfg)
        else:
            comment = setting.source if setting else (info.description or "")
            body += ["", *_keyed_line("", section, _yaml_value(values[section]), comment)]
    return "\n".join(header + body) + "\n"


def write_profile(name: str, path: str | Path = "params.yaml", *, force: bool = False) -> Path:
    """Write the profile's ``params.yaml`` to ``path``.

    Raises:
        ProfileError: the profile is unknown, or ``path`` exists and ``force`` is off.
    """
    path = Path(path)
    text = render_profile(name)
    if path.exists() and not force:
        raise ProfileError(f"{path} exists; pass --force to overwrite it with profile {name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
