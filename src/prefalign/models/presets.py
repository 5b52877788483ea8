"""Model architectures built from configs with random weights: no download, no network.

Three presets, all returning the stock diffusers / transformers classes that the training code uses
(``AutoencoderKL``, ``CLIPTextModel``, ``UNet2DConditionModel``), so a benchmark or a test on them runs
the same code path as a real checkpoint:

* ``sd15-random``: the Stable Diffusion 1.5 architecture at 512 px (64×64×4 latents, 77 text tokens of
  width 768). UNet 859.5 M parameters, VAE 83.7 M, CLIP text encoder 123.1 M (the published
  checkpoint's counts exactly): 1.066 B in all, 4.3 GB in float32 (the UNet alone 3.4 GB), so building
  it takes a while and gigabytes on a CPU. Build it on the ``meta``
  device to inspect shapes or count parameters for free.
* ``sd-mini``: SD1.5's exact layer structure (same blocks, layers, heads, attention placement, 77
  tokens, 49408-token vocabulary) with every channel width divided by 8, at 128 px (16×16×4 latents).
  Linear and conv weights shrink 64×, so the UNet has 1/64 of SD1.5's parameters (13.48 M vs
  859.5 M); the token embedding only shrinks 8× (its vocabulary is kept), so the three networks
  together are 1/51 of SD1.5 (20.9 M vs 1.066 B).
  Per image, the UNet's conv and linear FLOPs shrink 8²·4² = 1024× (widths 8×, latent side 4×). It keeps
  SD1.5's structure, and so roughly its cost proportions between UNet, VAE and text encoder (attention
  shrinks somewhat more than convolutions), which is what a structural benchmark needs, at a size a
  CPU trains in seconds.
* ``demo``: the project's tiny demo model (``ModelConfig`` defaults, 16 px, 8×8×4 latents, 32 tokens
  from the demo world's generated tokenizer), built by ``prefalign.models.diffusion``.

The text encoders of ``sd-mini`` and ``sd15-random`` come without a tokenizer: feed token ids directly
(any ids below ``text_encoder.config.vocab_size``, ``text_encoder.config.max_position_embeddings`` long).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

PRESET_NAMES = ("demo", "sd-mini", "sd15-random")

# SD1.5's VAE latent scale (its model card; every SD1.x checkpoint ships this value).
SD15_VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class SD15Widths:
    """The channel widths of the SD1.5 family; ``sd-mini`` is ``SD15_WIDTHS.divided_by(8)``.

    Group norms keep SD1.5's channels *per group* (320 / 32 = 40 / 4 = 10), so the number of groups
    shrinks with the widths. Head counts stay (8 in the UNet, 12 in the text encoder) and head
    dimensions shrink instead: the attention pattern stays SD1.5's, only narrower.
    """

    unet_blocks: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_norm_groups: int = 32
    vae_blocks: tuple[int, ...] = (128, 256, 512, 512)
    vae_norm_groups: int = 32
    text_hidden: int = 768
    text_intermediate: int = 3072

    def divided_by(self, divisor: int) -> SD15Widths:
        """Every width (and group count) divided by ``divisor``; raises if one does not divide."""
        values: dict[str, Any] = {
            "unet_blocks": self.unet_blocks,
            "unet_norm_groups": self.unet_norm_groups,
            "vae_blocks": self.vae_blocks,
            "vae_norm_groups": self.vae_norm_groups,
            "text_hidden": self.text_hidden,
            "text_intermediate": self.text_intermediate,
        }
        flat = [v for value in values.values() for v in (value if isinstance(value, tuple) else (value,))]
        if any(v % divisor for v in flat):
            raise ValueError(f"width divisor {divisor} does not divide every SD1.5 width {flat}")
        divided: dict[str, Any] = {
            key: tuple(v // divisor for v in value) if isinstance(value, tuple) else value // divisor
            for key, value in values.items()
        }
        return SD15Widths(**divided)


SD15_WIDTHS = SD15Widths()
SD15_UNET_HEADS = 8  # diffusers' `attention_head_dim=8` for SD1.5 is really the head *count* (a naming quirk)
SD15_TEXT_HEADS = 12
SD15_TEXT_LAYERS = 12
SD15_TEXT_TOKENS = 77
SD15_VOCAB = 49408
SD15_CROSS_ATTENTION_DIM = 768  # = the text encoder's hidden width


class PresetModels(NamedTuple):
    """The three networks of a preset and the image side they are meant for (unpacks as a 4-tuple)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    resolution: int


def sd15_family_unet(widths: SD15Widths, *, sample_size: int) -> UNet2DConditionModel:
    """SD1.5's UNet: 4 levels of 2 ResNet layers, cross-attention on the top 3, 8 heads everywhere."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=widths.unet_blocks,
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1.0,
        act_fn="silu",
        norm_num_groups=widths.unet_norm_groups,
        norm_eps=1e-5,
        cross_attention_dim=widths.text_hidden,
        attention_head_dim=SD15_UNET_HEADS,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def sd15_family_vae(widths: SD15Widths, *, sample_size: int) -> AutoencoderKL:
    """SD1.5's VAE: 4 levels (3 downsamplings, 8× per side) of 2 layers, 4 latent channels."""
    from diffusers import AutoencoderKL

    levels = len(widths.vae_blocks)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths.vae_blocks,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=widths.vae_norm_groups,
        sample_size=sample_size,
        scaling_factor=SD15_VAE_SCALING_FACTOR,
    )


def sd15_family_text_encoder(widths: SD15Widths) -> CLIPTextModel:
    """SD1.5's text encoder (CLIP ViT-L/14's text tower): 12 layers, 12 heads, 77 positions, quick-GELU."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=SD15_VOCAB,
        hidden_size=widths.text_hidden,
        intermediate_size=widths.text_intermediate,
        projection_dim=widths.text_hidden,
        num_hidden_layers=SD15_TEXT_LAYERS,
        num_attention_heads=SD15_TEXT_HEADS,
        max_position_embeddings=SD15_TEXT_TOKENS,
        hidden_act="quick_gelu",
        # CLIP's real special ids (<|startoftext|>, <|endoftext|>, which also pads).
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


PRESET_RESOLUTIONS = {"demo": 16, "sd-mini": 128, "sd15-random": 512}
SD_MINI_WIDTH_DIVISOR = 8


def _build_sd15_family(widths: SD15Widths, resolution: int) -> tuple[Any, Any, Any, int]:
    vae_downsampling = 2 ** (len(widths.vae_blocks) - 1)
    return (
        sd15_family_vae(widths, sample_size=resolution),
        sd15_family_text_encoder(widths),
        sd15_family_unet(widths, sample_size=resolution // vae_downsampling),
        resolution,
    )


def _build_demo() -> tuple[Any, Any, Any, int]:
    from prefalign.config import ModelConfig
    from prefalign.models.diffusion import build_tiny_text_encoder, build_tiny_unet, build_tiny_vae
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    cfg = ModelConfig()
    vae = build_tiny_vae(cfg)
    latent_size = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    # The tokenizer only sizes the text encoder (vocabulary, positions, special ids); it is not returned.
    text_encoder = build_tiny_text_encoder(cfg, build_tokenizer(vocabulary_words()))
    return vae, text_encoder, build_tiny_unet(cfg, latent_size), cfg.resolution


_BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any, int]]] = {
    "demo": _build_demo,
    "sd-mini": lambda: _build_sd15_family(
        SD15_WIDTHS.divided_by(SD_MINI_WIDTH_DIVISOR), PRESET_RESOLUTIONS["sd-mini"]
    ),
    "sd15-random": lambda: _build_sd15_family(SD15_WIDTHS, PRESET_RESOLUTIONS["sd15-random"]),
}


def build_preset(name: str, *, seed: int = 0, device: str | torch.device = "cpu") -> PresetModels:
    """Build a preset's VAE, text encoder and UNet with seeded random weights, in float32.

    Args:
        name: ``demo``, ``sd-mini`` or ``sd15-random`` (module docstring: what each one is).
        seed: Seed of the weight initialisation; the caller's global RNG state is left untouched.
        device: Where to allocate the weights. ``"meta"`` allocates nothing (shapes and parameter
            counts only), which is how to look at ``sd15-random`` without its 4.3 GB.

    Returns:
        ``PresetModels(vae, text_encoder, unet, resolution)`` in train mode, all parameters trainable.

    Raises:
        ValueError: an unknown preset name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vae, text_encoder, unet, resolution = _BUILDERS[name]()
    return PresetModels(vae, text_encoder, unet, resolution)


def latent_side(models: PresetModels) -> int:
    """Side of the VAE latents at the preset's resolution (the VAE downsamples by 2 per level but the last)."""
    return models.resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)


def parameter_counts(models: PresetModels) -> dict[str, int]:
    """Parameters per network and in total (works on ``meta`` models too)."""
    counts = {
        "vae": sum(p.numel() for p in models.vae.parameters()),
        "text_encoder": sum(p.numel() for p in models.text_encoder.parameters()),
        "unet": sum(p.numel() for p in models.unet.parameters()),
    }
    counts["total"] = sum(counts.values())
    return counts
