"""Diffusion models: the demo's tiny Stable Diffusion built from config, local SD folders, LoRA, policies.

Every model the pipeline trains or evaluates is a stock ``StableDiffusionPipeline`` folder plus, for a
policy, either a diffusers-format LoRA file (``pytorch_lora_weights.safetensors``, what
``load_lora_weights`` reads) or a full ``unet/`` folder. So the demo runs the same code path as SD1.5.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from prefalign.config import LoraConfig, ModelConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"

# SD1.5's scheduler: the demo keeps it so that β, timesteps and noise levels mean what they mean there.
SCHEDULER_KWARGS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as the SD VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def build_tiny_vae(cfg: ModelConfig) -> AutoencoderKL:
    """Demo VAE: ``len(vae_channels) - 1`` downsamplings (16 px -> 8x8x4 latents with two blocks)."""
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, min(cfg.vae_channels)),
        sample_size=cfg.resolution,
    )


def build_tiny_unet(cfg: ModelConfig, latent_size: int) -> UNet2DConditionModel:
    """Demo UNet on latents; cross-attention below the top level only.

    Attention at the full latent resolution costs more than it gives here (measured on the first
    demo trial: 5-10x slower steps). Three levels (8x8, 4x4, 2x2 latents) on the demo: a convolution's zero padding is
    the only thing that tells a UNet where it is, and at the 2x2 level every cell is a different corner,
    one per quadrant. With two levels the base never learned to read the position words (its output
    changed 0.4-0.9% when only the position word changed, against 4-16% for the other words) and no
    fine-tune taught it (docs/alignment_notes.md).
    """
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_tiny_text_encoder(cfg: ModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Demo CLIP text encoder sized to the generated tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=2 * cfg.text_hidden,
        num_attention_heads=4,
        num_hidden_layers=cfg.text_layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_scheduler(kind: str = "ddpm"):
    """SD1.5's noise schedule as a DDPM (training), DDIM or DPM-Solver++ (sampling) scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    ddpm = DDPMScheduler(**SCHEDULER_KWARGS)
    match kind:
        case "ddpm":
            return ddpm
        case "ddim":
            return DDIMScheduler.from_config(ddpm.config)
        case "dpmsolver++":
            # from_config keeps the noise schedule and drops DDPM-only keys such as clip_sample.
            return DPMSolverMultistepScheduler.from_config(ddpm.config, algorithm_type="dpmsolver++")
        case _:
            raise ValueError(f"unknown scheduler {kind!r}; expected ddpm, ddim or dpmsolver++")


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    """A stock pipeline without safety checker (the demo world has nothing to filter)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler("dpmsolver++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(folder: str | Path) -> Path:
    """Fail early, naming the path, unless ``folder`` is a local single-text-encoder SD pipeline folder.

    Checks model_index.json and the five component folders; SDXL folders (``text_encoder_2``) are refused
    by name, since featurize and the trainers condition on one text encoder.

    Raises:
        ValueError: the folder, its model_index.json or a component is missing, or it is an SDXL folder.
    """
    path = Path(folder)
    index_file = path / "model_index.json"
    if not path.is_dir():
        # The sd15 profile writes a placeholder path: say which key to set, not only what is missing.
        raise ValueError(
            f"base model {str(path)!r}: no model_index.json, the folder does not exist; set model.pretrained_path "
            "to your local SD1.x diffusers folder"
        )
    if not index_file.is_file():
        raise ValueError(
            f"base model {str(path)!r}: no model_index.json, so it is not a local diffusers pipeline folder"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"base model {str(path)!r}: model_index.json is not JSON ({err})") from None
    if "text_encoder_2" in index:
        raise ValueError(
            f"base model {str(path)!r}: an SDXL pipeline ({index.get('_class_name')}); "
            "only single-text-encoder SD1.x/2.x folders are supported"
        )
    missing = [name for name in PIPELINE_COMPONENTS if name not in index or not (path / name).is_dir()]
    if missing:
        raise ValueError(f"base model {str(path)!r}: missing component(s) {', '.join(missing)}")
    return path


class BaseResolution(NamedTuple):
    """What a base folder's configs say about image size."""

    vae_factor: int  # pixels per latent cell along a side: 2 ** (len(vae block_out_channels) - 1)
    trained: int  # the side the UNet was built for: unet sample_size x vae_factor


def _component_config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"base model {str(folder)!r}: no {component}/config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if isinstance(config, dict):
        return config
    raise ValueError(f"{path}: not a JSON object")


def base_resolution(folder: str | Path) -> BaseResolution:
    """The VAE factor and trained image side of a diffusers SD folder, from its json configs alone (no weights).

    Raises:
        ValueError: a config file is missing or unreadable, or lacks ``block_out_channels`` / ``sample_size``
            (named with the file).
    """
    folder = Path(folder)
    vae, unet = _component_config(folder, "vae"), _component_config(folder, "unet")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{folder / 'vae/config.json'}: no block_out_channels list")
    sample_size = unet.get("sample_size")
    # A few configs store (height, width); a square one is the only kind the trainers take.
    if isinstance(sample_size, list) and len(sample_size) == 2 and sample_size[0] == sample_size[1]:
        sample_size = sample_size[0]
    if not isinstance(sample_size, int) or sample_size <= 0:
        raise ValueError(f"{folder / 'unet/config.json'}: sample_size {sample_size!r} is not one positive side")
    factor = 2 ** (len(blocks) - 1)
    return BaseResolution(vae_factor=factor, trained=sample_size * factor)


def check_base_resolution(model: ModelConfig, folder: str | Path) -> BaseResolution:
    """Fail before any GPU work unless ``model.resolution`` suits the base folder.

    It must be a multiple of the folder's VAE factor, and equal its trained size unless
    ``model.allow_resolution_mismatch`` (an SD1.5 base sampled at 256 px makes poor images, and a DPO
    fine-tune at that size would align a model nobody serves).

    Raises:
        ValueError: names ``model.resolution``, its value and the folder's number it breaks.
    """
    found = base_resolution(folder)
    if model.resolution % found.vae_factor:
        raise ValueError(
            f"model.resolution ({model.resolution}) must be a multiple of the VAE downsampling factor "
            f"({found.vae_factor}) of base model {str(folder)!r}"
        )
    if model.resolution != found.trained and not model.allow_resolution_mismatch:
        raise ValueError(
            f"model.resolution ({model.resolution}) differs from the trained size ({found.trained} px: unet "
            f"sample_size x VAE factor) of base model {str(folder)!r}; set model.resolution: {found.trained}, "
            "or model.allow_resolution_mismatch: true to train at another size on purpose"
        )
    return found


def folder_fingerprint(folder: Path) -> dict[str, object]:
    """sha256 of every file under ``folder`` (path and content), with the file count and total bytes.

    Records which base weights a run used when they live outside DVC (``model.pretrained_path``).
    """
    from prefalign.versioning import files_sha256

    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return {
        "sha256": files_sha256(Path(folder), files),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")


def saved_safety_components(folder: Path) -> bool:
    """True when the folder's model_index.json lists both a safety checker and its feature extractor.

    A pipeline saved with ``safety_checker=None`` (the demo's) lists them as ``[null, null]``: not saved.

    Raises:
        ValueError: only one of the two is listed (the pipeline cannot run a checker without its extractor).
    """
    index = json.loads((Path(folder) / "model_index.json").read_text())
    saved = [name for name in SAFETY_COMPONENTS if isinstance(index.get(name), list) and index[name][:1] != [None]]
    if len(saved) == 1:
        raise ValueError(
            f"base model {str(folder)!r}: model_index.json lists {saved[0]} without "
            f"{next(n for n in SAFETY_COMPONENTS if n not in saved)}; save both or neither"
        )
    return bool(saved)


def load_base_pipeline(
    folder: Path, *, dtype: torch.dtype = torch.float32, keep_safety_checker: bool = False
) -> StableDiffusionPipeline:
    """Load a local diffusers folder; never a hub id (offline machines hang on those), never pickles.

    ``keep_safety_checker`` loads the folder's safety checker and feature extractor when it has them
    (images for people); off, or for a folder saved without them (the demo's), the pipeline has none, which
    is what training and featurizing want: the checker only filters decoded images.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    keep = keep_safety_checker and saved_safety_components(folder)
    # Left out, from_pretrained loads the folder's checker and its requires_safety_checker flag.
    checker: dict[str, Any] = {} if keep else {"safety_checker": None, "requires_safety_checker": False}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder),
        torch_dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        **checker,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_policy_pipeline(
    base_dir: Path, policy_dir: Path | None, *, keep_safety_checker: bool = True
) -> StableDiffusionPipeline:
    """The base pipeline with a policy applied: a diffusers LoRA file, a full ``unet/`` folder, or nothing.

    It generates images for people (serving, evaluation), so by default it keeps the base folder's safety
    checker when the folder has one; ``keep_safety_checker=False`` when only the weights are wanted.
    """
    from diffusers import UNet2DConditionModel

    pipe = load_base_pipeline(base_dir, keep_safety_checker=keep_safety_checker)
    if policy_dir is None:
        return pipe
    policy_dir = Path(policy_dir)
    if (policy_dir / "unet" / "config.json").is_file():
        pipe.unet = UNet2DConditionModel.from_pretrained(
            str(policy_dir / "unet"), local_files_only=True, use_safetensors=True
        )
    elif (policy_dir / LORA_FILE).is_file():
        pipe.load_lora_weights(str(policy_dir), weight_name=LORA_FILE)
        # Fused then unloaded: plain weights again, so the UNet saves and re-adapts like a base UNet.
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        raise FileNotFoundError(f"{policy_dir}: neither a unet/ folder nor {LORA_FILE}")
    return pipe


def add_lora(unet: UNet2DConditionModel, lora: LoraConfig, *, adapter_name: str = "default") -> int:
    """Inject a peft LoRA adapter; only its parameters stay trainable. Returns the trainable count.

    Raises:
        ValueError: a target names no module of the UNet (peft would silently skip or fail obscurely).
    """
    from peft import LoraConfig as PeftLoraConfig

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of the UNet; check dpo/dro.lora.targets")
    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian", target_modules=list(lora.targets)
        ),
        adapter_name=adapter_name,
    )
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write the adapter in the diffusers format that ``pipeline.load_lora_weights`` reads.

    Keys stay in peft's ``lora_A``/``lora_B`` naming under the ``unet.`` prefix, which the diffusers
    loader reads as is. ``convert_state_dict_to_diffusers`` must not be applied: it renames only the
    attention projections (to ``lora.down``/``lora.up``), and with conv targets beside them the loader
    sees peft keys, takes the file as peft and silently skips every attention adapter.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    return folder / LORA_FILE


def load_base_unet(base_dir: Path) -> UNet2DConditionModel:
    """The base UNet alone, in float32, from a local pipeline folder."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        str(Path(base_dir) / "unet"), local_files_only=True, use_safetensors=True
    )


def unet_with_policy(base_dir: Path, policy_dir: Path | None) -> UNet2DConditionModel:
    """A plain UNet with ``policy_dir`` (LoRA or full UNet) merged into its weights."""
    return load_policy_pipeline(base_dir, policy_dir, keep_safety_checker=False).unet
