"""The one config: ``params.yaml`` validated by pydantic v2.

Every section of ``params.yaml`` is a model here with ``extra="forbid"``, so a typo, a wrong type or
an out-of-range value fails at load time with the dotted key in the message, before any stage starts.
``load_config(path, overrides)`` merges dotted overrides (``dpo.beta=5000``) into the YAML *before*
validation, so overrides are checked exactly like the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

DPOVariant = Literal["sigmoid", "hinge", "ipo"]
MixedPrecision = Literal["no", "bf16", "fp16"]
PolicyOptimizer = Literal["adamw", "adafactor"]
RewardLoss = Literal["bt", "pl", "mixed"]
RewardSelection = Literal["loss", "accuracy"]
PolicyMethod = Literal["dpo", "dro"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A params file that cannot be used: names the file and every offending dotted key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Where every stage reads and writes, relative to the repo root (``root``)."""

    root: str = Field(".", description="Repo root; every other path is relative to it.")
    world: str = Field("data/world", description="Demo world: prompt table and pretraining renderings.")
    source: str = Field("data/source", description="Raw feedback for `ingest` when data.source is not demo.")
    preferences: str = Field("data/preferences", description="Canonical preference tables + image store.")
    features: str = Field("data/features", description="Cached VAE latents and text embeddings.")
    base_model: str = Field("models/base", description="Base diffusers pipeline (pretrained on the demo world).")
    reward: str = Field("models/reward", description="Trained reward model (CLIPModel format).")
    dpo: str = Field("models/dpo", description="Diffusion-DPO LoRA adapter (diffusers format).")
    dro: str = Field("models/dro", description="Diffusion-DRO result (full UNet over the base).")
    checkpoints: str = Field(
        "checkpoints", description="Resumable training state per stage; outside every DVC output, git-ignored."
    )
    reports: str = Field("reports", description="Small JSON metrics and PNG figures.")

    def resolve(self, name: str) -> Path:
        """Absolute path of the named entry."""
        value = getattr(self, name)
        return (Path(self.root) / value).resolve()


class World(Section):
    """The demo world: renderer, captions, annotators. Its noise levels are set for realism."""

    image_size: PositiveInt = Field(16, description="Side of the square renderings in pixels.")
    n_pretrain_images: PositiveInt = Field(6000, description="Renderings made for base-model pretraining.")
    caption_error_rate: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of pretraining captions with one attribute wrong (web-style noise)."
    )
    pixel_noise_max: NonNegativeFloat = Field(
        25.0, description="Pretraining renderings get Gaussian pixel noise of sigma U(0, this) on a 0-255 scale."
    )
    annotator_tau: PositiveFloat = Field(
        0.08, description="Bradley-Terry temperature of simulated annotators: P(a>b)=sigmoid((o(a)-o(b))/tau)."
    )
    n_annotators: PositiveInt = Field(20, description="Number of simulated annotators (ids are pseudonymised).")


class Pretrain(Section):
    """Pretraining of the tiny base model on the demo world (VAE first, then UNet and text encoder)."""

    vae_steps: NonNegativeInt = Field(500, description="VAE optimizer steps.")
    vae_lr: PositiveFloat = Field(2e-3, description="VAE learning rate.")
    vae_kl_weight: NonNegativeFloat = Field(1e-6, description="KL weight of the VAE loss.")
    unet_steps: NonNegativeInt = Field(1000, description="UNet + text encoder optimizer steps.")
    unet_lr: PositiveFloat = Field(1e-3, description="UNet + text encoder learning rate.")
    unet_lr_schedule: Literal["constant_with_warmup", "cosine"] = Field(
        "cosine", description="UNet + text encoder schedule after a 50-step warmup (diffusers get_scheduler)."
    )
    batch_size: PositiveInt = Field(64, description="Images per optimizer step.")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Empty-caption rate (enables guidance).")
    caption_position_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Share of pretraining captions that keep their position phrase (web "
        "captions rarely say where things are); the others drop it, keyed by image.",
    )
    text_encoder: Literal["joint", "frozen"] = Field(
        "frozen",
        description="joint: trained with the UNet (words the UNet does not use collapse in its output); "
        "frozen: fixed at its initialisation with unit-scale word embeddings, as SD keeps CLIP frozen, so every "
        "word stays distinct and a fine-tune can learn to use it.",
    )


class DataConfig(Section):
    """Where feedback comes from and how it is split."""

    source: Literal["demo", "pickapic", "hpd", "jsonl"] = Field(
        "demo",
        description="demo: build the pool from the world; pickapic | hpd | jsonl: import paths.source in that format.",
    )
    split_train: float = Field(0.8, gt=0.0, lt=1.0, description="Share of prompts (by sha256 mod 100) in train.")
    split_val: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts in val; the rest is test.")
    pool_prompts: PositiveInt = Field(540, description="Demo: prompts in the preference pool (all if larger).")
    pool_base_samples: NonNegativeInt = Field(8, description="Demo: base-model samples per prompt.")
    pool_renderings: NonNegativeInt = Field(2, description="Demo: corrupted renderings per prompt ('other models').")
    pool_pairs_per_prompt: PositiveInt = Field(45, description="Demo: pairs drawn per prompt from its images.")
    pool_sample_steps: PositiveInt = Field(10, description="Demo: sampler steps for base-model samples.")
    pool_guidance: NonNegativeFloat = Field(3.0, description="Demo: guidance scale of base-model samples.")

    @model_validator(mode="after")
    def _splits_leave_room(self) -> DataConfig:
        if self.split_train + self.split_val >= 1.0:
            raise ValueError("split_train + split_val must be < 1 so that a test split exists")
        return self


class Validation(Section):
    """Thresholds of the Great Expectations gate."""

    min_pairs: NonNegativeInt = Field(100, description="Fewest pairs accepted.")
    max_pairs: PositiveInt = Field(10_000_000, description="Most pairs accepted.")
    max_tie_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Largest share of ties (label 0.5).")
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Largest share of rows quarantined.")
    min_image_side: PositiveInt = Field(8, description="Smallest image side in pixels.")
    max_image_side: PositiveInt = Field(4096, description="Largest image side in pixels.")
    max_prompt_chars: PositiveInt = Field(2000, description="Longest prompt accepted.")


class Featurize(Section):
    """Cached VAE latents and text embeddings, in shards that training reads memory-mapped.

    There is no horizontal-flip option: the demo's prompts name left and right, so a flipped image
    answers a different prompt, and the DPO/DRO trainers never read flipped latents. A keyed flip
    would need a flipped twin of every latent and a trainer that picks one per sample; neither is built.
    """

    batch_size: PositiveInt = Field(256, description="Images per VAE forward.")
    num_workers: NonNegativeInt = Field(
        0,
        description="DataLoader processes that decode and resize images (0: in the main process, enough for "
        "the demo's 16 px PNGs; 512-1024 px JPEGs want several per GPU).",
    )
    shard_size: PositiveInt = Field(4096, description="Images per latents-NNNNN.safetensors shard.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="VAE, text encoder and cache dtype. auto: bfloat16 on CUDA, float32 elsewhere (the CPU "
        "demo stays bit-identical).",
    )


class ModelConfig(Section):
    """The diffusion model: the demo's tiny Stable Diffusion or a local diffusers folder."""

    preset: Literal["demo", "sd15", "sd15-random"] = Field("demo", description="Model family.")
    pretrained_path: str | None = Field(
        None,
        description="Local SD1.x diffusers folder for sd15, relative to the params file, used in place (never a "
        "hub id).",
    )
    resolution: PositiveInt = Field(
        16,
        description="Training/sampling resolution in pixels, a multiple of the VAE's downsampling factor. "
        "demo: world.image_size (leave it out); sd15: required, the base's trained size (512 for SD1.5).",
    )
    allow_resolution_mismatch: bool = Field(
        False,
        description="Allow a model.resolution other than the base folder's trained size (UNet sample_size x VAE "
        "factor); off, the mismatch fails before any GPU work.",
    )
    unet_channels: tuple[PositiveInt, ...] = Field((64, 128, 128), description="Demo UNet block widths.")
    vae_channels: tuple[PositiveInt, ...] = Field((32, 64), description="Demo VAE block widths.")
    text_hidden: PositiveInt = Field(64, description="Demo CLIP text encoder width.")
    text_layers: PositiveInt = Field(2, description="Demo CLIP text encoder layers.")

    def vae_downsampling(self) -> int:
        """Pixels per latent cell along a side, as far as the config knows it.

        demo: ``2 ** (len(vae_channels) - 1)``, the VAE ``pretrain_base`` builds. sd15 / sd15-random: 8, the
        factor of every SD1.x/2.x VAE; ``models.diffusion.check_base_resolution`` checks a folder's own.
        """
        if self.preset == "demo":
            return 2 ** (len(self.vae_channels) - 1)
        return SD_VAE_DOWNSAMPLING


# Four VAE levels, three of which halve the side: SD1.x/2.x encode 512 px into 64x64 latents.
SD_VAE_DOWNSAMPLING = 8


def _cuda_available() -> bool:
    # Imported here: the config module stays importable without loading torch.
    import torch

    return torch.cuda.is_available()


class RewardConfig(Section):
    """Reward model: CLIP-style dual encoder, score = scale * cos(text, image).

    ``lr`` 2e-4 suits the demo's tiny backbone after its CLIP pretraining. Fine-tunes of a pretrained CLIP
    take one to two orders of magnitude less, about 1e-6 to 1e-5: PickScore 3e-6 (CLIP-H, 4000 steps of 128
    pairs, 500 warmup; 1e-6 in its repository's config), HPS v2 3.3e-6, ImageReward 1e-5 (70% frozen). A
    profile (``prefalign init --profile``) sets it with ``mixed_precision`` and ``gradient_checkpointing``.
    """

    backbone: str = Field("tiny", description="'tiny' (built from config) or a local CLIP folder.")
    loss: RewardLoss = Field("bt", description="bt on pairs, pl on rankings, or mixed.")
    keep_ties: bool = Field(True, description="Use ties with the soft-label BT loss.")
    steps: PositiveInt = Field(1500, description="Optimizer steps.")
    lr: PositiveFloat = Field(
        2e-4,
        description="Learning rate: 2e-4 for the tiny backbone after its CLIP pretraining; about 1e-6 to 1e-5 to "
        "fine-tune a pretrained CLIP (PickScore 3e-6).",
    )
    batch_size: PositiveInt = Field(128, description="Pairs per step and process (accelerate launch: x processes).")
    mixed_precision: MixedPrecision = Field(
        "no",
        description="Autocast of the reward model's forwards on CUDA: no | bf16 | fp16 (training, validation, "
        "expert selection); CPU always runs in fp32.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the CLIP towers' layer activations in the backward (less memory, more compute)."
    )
    preload_max_bytes: NonNegativeInt = Field(
        2 * 1024**3,
        description="A split whose decoded images (uint8 at the backbone's size) take fewer bytes is decoded "
        "once onto the device; a larger one is decoded batch by batch (0: always on demand).",
    )
    num_workers: NonNegativeInt = Field(
        0,
        description="DataLoader processes decoding images on demand (0: in the training process, enough for "
        "small images; several per GPU for 512 px JPEGs).",
    )
    embed_dim: PositiveInt = Field(64, description="Tiny backbone projection width.")
    tiny_width: PositiveInt = Field(128, description="Tiny backbone: hidden width of both towers.")
    tiny_vision_layers: PositiveInt = Field(4, description="Tiny backbone: vision transformer layers.")
    tiny_patch_size: PositiveInt | None = Field(
        None, description="Tiny backbone: patch side (None: largest giving >= 4x4 patches)."
    )
    pretrain_steps: NonNegativeInt = Field(
        1500, description="Tiny backbone: CLIP pretraining steps on the world's captioned renderings (0: none)."
    )
    pretrain_lr: PositiveFloat = Field(1e-3, description="Tiny backbone: CLIP pretraining learning rate.")
    pretrain_batch_size: PositiveInt = Field(256, description="Tiny backbone: captioned images per pretraining step.")
    eval_every: PositiveInt = Field(100, description="Validation every N steps (early stopping).")
    patience: PositiveInt = Field(6, description="Evaluations without improvement before stopping.")
    select_on: RewardSelection = Field(
        "loss",
        description="Early stopping keeps the weights of the lowest validation BT loss ('loss') or of the best "
        "validation pairwise accuracy, loss breaking ties ('accuracy').",
    )
    ema_decay: float = Field(
        0.995, ge=0.0, lt=1.0, description="EMA of the weights, validated and kept instead of the raw ones (0: off)."
    )
    mirror_augment: bool = Field(
        True,
        description="Train each example mirrored with probability 1/2: images flipped, left/right swapped "
        "in the prompt.",
    )
    train_last_layers: NonNegativeInt | None = Field(
        None,
        description="None: the whole backbone trains; N: only the projections, logit_scale and each tower's last N "
        "layers (HPSv2-style; the tiny backbone's CLIP pretraining still trains all of it).",
    )


class LoraConfig(Section):
    """LoRA adapter of the UNet."""

    rank: PositiveInt = Field(8, description="LoRA rank.")
    alpha: PositiveFloat = Field(8.0, description="LoRA alpha (scale = alpha / rank).")
    targets: tuple[str, ...] = Field(
        ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"), description="Module names that get adapters."
    )


class TrainerConfig(Section):
    """The ``trainer`` section: settings every policy trainer (DPO, DRO, the SFT control) shares.

    Set once here; each method's section holds only what differs by method (its learning rate, steps,
    batches and warmup) and receives these at load.
    """

    lora: LoraConfig = Field(default_factory=LoraConfig)
    optimizer: PolicyOptimizer = Field("adamw", description="adamw, or adafactor (transformers, relative_step off).")
    max_grad_norm: PositiveFloat = Field(1.0, description="Gradient clipping.")
    mixed_precision: MixedPrecision = Field(
        "no", description="no | bf16 | fp16; CUDA only, CPU always trains in fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward (less memory).")
    checkpoint_every: NonNegativeInt = Field(
        50, description="Save a resumable checkpoint every N optimizer steps under paths.checkpoints (0: never)."
    )
    compile: bool = Field(
        True,
        description="torch.compile the UNet on CUDA (policy and reference pass share it). Never on CPU: compiling "
        "takes longer than the demo's whole training and needs a C++ toolchain.",
    )


TRAINER_FIELDS = tuple(TrainerConfig.model_fields)
POLICY_METHODS = ("dpo", "dro", "kto")


class PolicyTrainerConfig(TrainerConfig):
    """What one policy trainer runs with: the shared ``trainer`` settings plus its method's own."""

    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step (per process).")
    warmup_steps: NonNegativeInt = Field(
        0,
        description="Linear warmup steps (per method: DPO starts a fresh adapter against the large "
        "β-scaled loss, DRO continues from DPO's weights).",
    )


class DPOConfig(PolicyTrainerConfig):
    """Offline Diffusion-DPO (Wallace et al. 2024), β in the original code's convention."""

    beta: PositiveFloat = Field(
        500.0,
        description="β with mean-reduced errors and the -1/2 factor of the paper code (SD1.5/SDXL: 2000-5000).",
    )
    variant: DPOVariant = Field("sigmoid", description="sigmoid (paper), hinge or ipo.")
    lr: PositiveFloat = Field(1e-3, description="Learning rate.")
    steps: PositiveInt = Field(600, description="Optimizer steps.")
    batch_size: PositiveInt = Field(32, description="Pairs per micro-batch per process.")
    warmup_steps: NonNegativeInt = Field(20, description="Linear warmup steps (a fresh adapter, β-scaled loss).")
    prompt_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Share of pairs trained with the empty prompt.")
    timestep_min: int = Field(
        700,
        ge=0,
        lt=1000,
        description="Train on t ~ U{timestep_min..999}; 0 is the published uniform draw (use it "
        "for real models); 700 was measured on the demo world, where the layout is decided at high t "
        "(docs/alignment_notes.md, section 7).",
    )


class DROConfig(PolicyTrainerConfig):
    """Hybrid Diffusion-DRO (Wu et al. 2025): expert demonstrations + online negatives."""

    init_from: Literal["dpo", "base"] = Field("dpo", description="Start from the DPO result or from the base.")
    top_k: PositiveInt = Field(400, description="Expert demonstrations: top-K images by the reward model.")
    per_prompt_cap: PositiveInt = Field(2, description="At most this many experts per prompt.")
    margin: NonNegativeFloat = Field(1e-3, description="Hinge margin m.")
    lr: PositiveFloat = Field(5e-4, description="Learning rate.")
    steps: PositiveInt = Field(150, description="Optimizer steps.")
    batch_size: PositiveInt = Field(16, description="Expert/policy samples per micro-batch per process.")
    sample_steps: PositiveInt = Field(10, description="DPM-Solver++ steps of the online sampler.")
    guidance: NonNegativeFloat = Field(
        1.0, description="Guidance scale of the online sampler (1 = none, as published)."
    )
    reuse: PositiveInt = Field(4, description="Optimizer updates served by one recorded batch of trajectories.")
    sync_every: PositiveInt = Field(
        1, description="The sampler's copy of the adapter re-syncs with the trained one every M updates (published 1)."
    )
    prompt_dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of samples drawn and trained with the empty prompt (published 0.2)."
    )
    policy_target: Literal["recorded", "current"] = Field(
        "current",
        description="Target of the policy term: the recorded ε_pol (lags up to reuse-1 updates), or ε_φ(x_t) of the "
        "current adapter (the published M = 1: P_φ = 0, the term is a threshold).",
    )
    timestep_jitter: NonNegativeInt = Field(
        50, description="Per-round offset U{-j..j} added to the sampler's timestep grid (0: the plain grid)."
    )
    ema_decay: float = Field(
        0.9989,
        ge=0.0,
        lt=1.0,
        description="EMA decay of the adapter weights, exported when > 0 (0: off; published .9999).",
    )


class KTOConfig(PolicyTrainerConfig):
    """Diffusion-KTO (Li et al. 2024) on binary feedback: ``train_kto`` (``bench_efficacy.py --variants kto``)."""

    beta: PositiveFloat = Field(1000.0, description="β without the 1/2 factor (published 1000).")
    lr: PositiveFloat = Field(1e-3, description="Learning rate.")
    steps: PositiveInt = Field(600, description="Optimizer steps.")
    batch_size: PositiveInt = Field(32, description="Judged images per micro-batch per process.")
    warmup_steps: NonNegativeInt = Field(20, description="Linear warmup steps (a fresh adapter, as DPO).")
    prompt_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Share of images trained with the empty prompt.")
    timestep_min: int = Field(
        700, ge=0, lt=1000, description="Train on t ~ U{timestep_min..999}; 700 as dpo.timestep_min (0: published)."
    )


JudgeKind = Literal["clip_score", "pickscore", "hpsv2", "aesthetic"]
# Judges every evaluation has without configuring them: the demo world's oracle and the pipeline's reward model.
BUILTIN_JUDGES = ("oracle", "reward")
JUDGE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


class JudgeConfig(Section):
    """One independent judge of ``eval.judges``: a frozen published scorer loaded from a local folder."""

    kind: JudgeKind = Field(
        description="clip_score (a CLIPModel folder), pickscore (PickScore_v1, a CLIPModel folder), hpsv2 (a folder "
        "written by `prefalign judge convert-hps`) or aesthetic (a folder holding aesthetic_mlp.safetensors)."
    )
    path: str = Field(description="The judge's folder, relative to the params file's folder (never a hub id).")
    clip_path: str | None = Field(
        None, description="aesthetic only: its CLIP ViT-L/14 folder, relative to the params file; null: <path>/clip."
    )

    @model_validator(mode="after")
    def _clip_path_is_for_aesthetic(self) -> JudgeConfig:
        if self.clip_path is not None and self.kind != "aesthetic":
            raise ValueError(f"clip_path is for kind 'aesthetic' only (this judge is {self.kind!r})")
        return self


class EvalConfig(Section):
    """Evaluation of candidates against base and champion on held-out prompts with fixed seeds."""

    n_prompts: PositiveInt = Field(64, description="Held-out test prompts evaluated (all if fewer).")
    images_per_prompt: PositiveInt = Field(8, description="Seeds per prompt.")
    sample_steps: PositiveInt = Field(20, description="Sampler steps.")
    guidance: NonNegativeFloat = Field(3.0, description="Classifier-free guidance scale.")
    bootstrap: PositiveInt = Field(2000, description="Bootstrap resamples of prompts for the 95% interval.")
    batch_size: PositiveInt = Field(
        128, description="Images per sampler call (CFG doubles the UNet batch); lower it if a GPU runs out of memory."
    )
    judge: str = Field(
        "oracle",
        description="The judge whose scores decide promotion: oracle (demo world only), reward (the pipeline's own "
        "reward model, which also chose DRO's experts), or a name of eval.judges.",
    )
    judges: dict[str, JudgeConfig] = Field(
        default_factory=dict,
        description="Independent judges by name (lower-case, digits, underscores); every one scores every model. "
        "oracle and reward are built in.",
    )
    judge_batch_size: PositiveInt = Field(256, description="Images per forward pass of a judge.")
    grid_prompts: PositiveInt = Field(
        12, description="Held-out prompts shown in reports/eval/samples.png (at most the prompts evaluated)."
    )
    grid_seeds: PositiveInt = Field(
        2, description="Evaluation images per grid prompt shown per model (at most images_per_prompt)."
    )

    @model_validator(mode="after")
    def _judges_are_known(self) -> EvalConfig:
        for name in self.judges:
            if name in BUILTIN_JUDGES:
                raise ValueError(f"eval.judges.{name}: {name!r} is a built-in judge; give this one another name")
            if not (name[:1].isalpha() and set(name) <= JUDGE_NAME_CHARS):
                raise ValueError(
                    f"eval.judges.{name}: a judge name is lower-case letters, digits and underscores "
                    "(it becomes report keys such as <name>_mean)"
                )
        if self.judge not in (*BUILTIN_JUDGES, *self.judges):
            raise ValueError(
                f"eval.judge is {self.judge!r}: neither a built-in judge (oracle, reward) nor a name of eval.judges "
                f"({', '.join(self.judges) or 'none configured'})"
            )
        return self


class RegistryConfig(Section):
    """MLflow model registry names and the promotion rule."""

    policy_name: str = Field("prefalign-policy", description="Registered model of the diffusion policies.")
    reward_name: str = Field("prefalign-reward", description="Registered model of the reward models.")
    champion_alias: str = Field("champion", description="Alias of the promoted policy.")
    require_beats_base: bool = Field(True, description="Promote only candidates whose win-rate ci_low vs base > 0.5.")


class TrackingConfig(Section):
    """MLflow tracking: explicit local store inside the repo unless the environment says otherwise."""

    enabled: bool = Field(True, description="Log to MLflow; False uses the NullTracker.")
    uri: str = Field("sqlite:///mlruns/mlflow.db", description="Tracking URI; relative sqlite paths are under root.")
    artifact_root: str = Field("mlruns/artifacts", description="Artifact root for the experiment, under root.")
    experiment: str = Field("prefalign", description="Experiment name.")


class PipelineConfig(Section):
    """The whole of ``params.yaml``."""

    seed: int = Field(0, description="Global seed; every stage seeds from it.")
    paths: Paths = Field(default_factory=Paths)
    world: World = Field(default_factory=World)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    data: DataConfig = Field(default_factory=DataConfig)
    validation: Validation = Field(default_factory=Validation)
    featurize: Featurize = Field(default_factory=Featurize)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    dro: DROConfig = Field(default_factory=DROConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolution_of_the_preset(cls, data: Any) -> Any:
        """demo: ``model.resolution`` is the world's image size (set once); real presets must name theirs."""
        if not isinstance(data, Mapping) or not isinstance(data.get("model", {}), Mapping):
            return data
        model = dict(data.get("model") or {})
        preset = model.get("preset", "demo")
        if preset == "sdxl":
            # Fail at load rather than deep in featurize: SDXL conditions on two text encoders and on
            # size/crop time ids, which featurize and the policy trainer do not compute.
            raise ValueError(
                "model.preset 'sdxl' is not supported yet: featurize and the trainers take one text "
                "encoder (SD1.x/2.x folders); use preset 'sd15' with model.pretrained_path"
            )
        if preset == "demo":
            world = data.get("world") or {}
            image_size = world.get("image_size", World.model_fields["image_size"].default)
            if model.get("resolution", image_size) != image_size:
                raise ValueError(
                    f"model.resolution ({model['resolution']}) must equal world.image_size ({image_size}) for the "
                    "demo preset; leave model.resolution out, it follows world.image_size"
                )
            model["resolution"] = image_size
        elif preset == "sd15" and "resolution" not in model:
            raise ValueError("model.resolution is required for preset sd15 (512 for SD1.5)")
        return {**data, "model": model}

    @model_validator(mode="before")
    @classmethod
    def _shared_trainer_settings(cls, data: Any) -> Any:
        """Copy the ``trainer`` section into each policy method's; a method may not set them itself."""
        if not isinstance(data, Mapping):
            return data
        trainer = data.get("trainer") or {}
        if isinstance(trainer, BaseModel):
            trainer = trainer.model_dump()
        merged = dict(data)
        for method in POLICY_METHODS:
            section = data.get(method) or {}
            if not isinstance(section, Mapping):
                continue
            if own := sorted(key for key in section if key in TRAINER_FIELDS):
                raise ValueError(
                    f"{', '.join(f'{method}.{key}' for key in own)}: shared by every policy trainer; "
                    f"set {', '.join(f'trainer.{key}' for key in own)} instead"
                )
            merged[method] = {**section, **trainer}
        return merged

    @model_validator(mode="after")
    def _model_matches_world(self) -> PipelineConfig:
        if self.model.preset == "sd15" and not self.model.pretrained_path:
            raise ValueError("model.pretrained_path (a local diffusers folder) is required for preset sd15")
        return self

    @model_validator(mode="after")
    def _resolution_fits_the_vae(self) -> PipelineConfig:
        """A side the VAE cannot divide would give latents that do not decode back to ``model.resolution``."""
        factor = self.model.vae_downsampling()
        if self.model.resolution % factor:
            raise ValueError(
                f"model.resolution ({self.model.resolution}) must be a multiple of the VAE's downsampling factor "
                f"({factor}) for preset {self.model.preset}"
            )
        return self

    @model_validator(mode="after")
    def _full_precision_on_a_gpu(self) -> PipelineConfig:
        """Warn, not fail: fp32 on a GPU is legal but is rarely meant for a real model.

        The demo is left out on purpose: it trains in float32 everywhere so that its numbers stay comparable.
        """
        if self.model.preset != "demo" and self.trainer.mixed_precision == "no" and _cuda_available():
            log.warning(
                "trainer.mixed_precision is 'no' while CUDA is available: preset %s will train in float32 "
                "(slower, twice the activation memory); set trainer.mixed_precision: bf16",
                self.model.preset,
            )
        return self

    def base_model_dir(self) -> Path:
        """The base ``StableDiffusionPipeline`` folder every stage loads.

        demo: ``paths.base_model``, which ``pretrain_base`` writes. sd15: ``model.pretrained_path`` (relative
        to the params file's folder), used in place: ``pretrain_base`` then only checks it and records its
        fingerprint in ``paths.base_model``, so DVC tracks a small pointer instead of a copy of the weights.
        """
        if self.model.preset == "sd15" and self.model.pretrained_path:
            return (Path(self.paths.root) / self.model.pretrained_path).resolve()
        return self.paths.resolve("base_model")

    def section_sha(self, *sections: str) -> str:
        """Short sha256 of the named sections (all when none), for the params_sha tag."""
        dump = self.model_dump(mode="json")
        chosen = {k: dump[k] for k in (sections or dump.keys())}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'dpo.beta=5000'`` -> ``('dpo.beta', 5000)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), yaml.safe_load(raw)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        # A cross-field rule's input is the whole config: its message already names the keys.
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})" if key else f"  {item['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Load and validate ``params.yaml``; ``overrides`` are dotted keys merged in before validation.

    ``paths.root`` defaults to the folder holding the file, so stages work from any working directory.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown, mistyped or out of range;
            the message names the file and each dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = copy.deepcopy(raw)
    tree.setdefault("paths", {}).setdefault("root", str(path.resolve().parent))
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path))) from None
