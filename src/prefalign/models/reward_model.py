"""Reward model: a CLIP-style dual encoder whose score is exp(logit_scale) · cos(text, image).

This is PickScore's (Kirstain et al. 2023) and HPSv2's (Wu et al. 2023) architecture: a stock
transformers ``CLIPModel``, so a trained reward model is a plain CLIP folder that
``CLIPModel.from_pretrained`` loads anywhere. On the demo world the backbone is a tiny CLIP built from
config with the grammar's word-level tokenizer; on real data it is a local CLIP folder (never a hub id).

Preprocessing is ours (no torchvision here): uint8 HWC images are resized (PIL bilinear, shortest side,
centre crop, as CLIP's processor) to the model's ``image_size`` when they differ, scaled to [0, 1] and
normalised with the folder's ``image_mean`` / ``image_std`` (CLIP's by default).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants: every public CLIP backbone (and PickScore, HPSv2) expects them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
# exp(logit_scale) is capped at 100 as in CLIP training: beyond it a tiny model can shrink the loss by
# inflating the scale instead of separating the embeddings.
MAX_LOGIT_SCALE = float(np.log(100.0))


def tiny_patch_size(image_size: int) -> int:
    """Largest patch side that divides ``image_size`` and still leaves a grid of at least 4×4 patches.

    16 px -> 4 px patches (16 patches): enough tokens for attention to tell the five named positions apart.
    """
    candidates = [p for p in range(1, image_size + 1) if image_size % p == 0 and image_size // p >= 4]
    if not candidates:
        raise ValueError(f"image_size must be at least 4 pixels, got {image_size}")
    return max(candidates)


def build_tiny_reward_model(
    tokenizer: CLIPTokenizer,
    *,
    image_size: int = 16,
    embed_dim: int = 64,
    seed: int = 0,
    width: int = 64,
    vision_layers: int = 3,
    patch_size: int | None = None,
) -> CLIPModel:
    """A randomly initialised tiny ``CLIPModel`` for the demo world (about 0.22 M parameters with the demo vocabulary).

    Text tower: 2 layers of width 64 over the tokenizer's vocabulary. Vision tower: 3 layers of width 64
    over ``tiny_patch_size(image_size)`` patches. Both project to ``embed_dim``.

    Args:
        tokenizer: the word-level CLIP tokenizer; sets vocabulary size, positions and special ids.
        image_size: side of the (square) input images in pixels.
        embed_dim: width of the shared text-image embedding space.
        seed: initialisation seed (the global torch RNG is left untouched).
        width: hidden width of both towers (MLP 2x, heads of 16 channels).
        vision_layers: transformer layers of the vision tower.
        patch_size: vision patch side; None picks ``tiny_patch_size(image_size)``.

    Returns:
        The model in train mode.
    """
    from transformers import CLIPConfig, CLIPModel

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": max(1, width // 16),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "image_size": image_size,
        "patch_size": patch_size or tiny_patch_size(image_size),
        "num_channels": 3,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": max(1, width // 16),
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.train()


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HWC image so its shorter side is ``size`` (PIL bilinear), then centre-crop a square."""
    from PIL import Image

    height, width = image.shape[:2]
    if height == width == size:
        return image
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def check_clip_folder(folder: str | Path) -> Path:
    """Fail early, naming the path, unless ``folder`` holds a CLIP model config (model_type "clip").

    Raises:
        ValueError: the folder is missing, has no ``config.json``, or holds another kind of model.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"reward backbone {str(path)!r}: folder not found (a local CLIP folder or 'tiny')")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"reward backbone {str(path)!r}: no config.json, so it is not a saved transformers model")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"reward backbone {str(path)!r}: config.json is not a JSON object ({err})") from None
    if model_type != "clip":
        raise ValueError(f"reward backbone {str(path)!r}: model_type is {model_type!r}, expected 'clip' (CLIPModel)")
    return path


class RewardScorer:
    """A ``CLIPModel`` with its tokenizer and image preprocessing; score = exp(logit_scale) · cos(t, i).

    Attributes:
        model: the dual encoder (trained in place by ``prefalign.training.reward``).
        tokenizer: its ``CLIPTokenizer``.
        image_mean, image_std: per-channel normalisation applied after scaling pixels to [0, 1].
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        *,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    @property
    def image_size(self) -> int:
        """Side of the square images the vision tower takes."""
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_text_length(self) -> int:
        """Longest token sequence: the tokenizer's limit, bounded by the text tower's positions."""
        positions = int(self.model.config.text_config.max_position_embeddings)
        return min(int(self.tokenizer.model_max_length), positions)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` padded to the longest prompt, on the model's device."""
        encoded = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def pixel_values(self, images: np.ndarray) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, S, S)`` on the model's device."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        return self.normalise(self.uint8_pixels(images))

    def uint8_pixels(self, images: np.ndarray) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> uint8 ``(N, 3, S, S)`` on the model's device, resized if needed.

        Kept as uint8 so a whole training split fits in memory (4x smaller than floats); ``normalise``
        converts one batch at a time.
        """
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([resize_image(img, self.image_size) for img in images])
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).contiguous()

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 ``(N, 3, S, S)`` -> float ``(N, 3, S, S)`` scaled to [0, 1] and normalised per channel."""
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-norm text embeddings ``(N, D)``."""
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return torch.nn.functional.normalize(features, dim=-1)

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(N, D)``."""
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(features, dim=-1)

    def logit_scale(self) -> Tensor:
        """The learned score scale exp(logit_scale), a scalar tensor."""
        return self.model.logit_scale.exp()

    def forward_scores(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        """Differentiable scores ``(N,)`` of N (prompt, image) pairs, row by row."""
        text = self.text_embeddings(input_ids, attention_mask)
        image = self.image_embeddings(pixel_values)
        return self.logit_scale() * (text * image).sum(dim=-1)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Scores of ``prompts[i]`` with ``images[i]`` as float32 ``(N,)``; eval mode, no gradients."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = []
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = self.tokenize(prompts[start : start + batch_size])
                pixels = self.pixel_values(images[start : start + batch_size])
                chunks.append(self.forward_scores(input_ids, attention_mask, pixels).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)

    def save(self, folder: str | Path) -> Path:
        """Write a stock CLIP folder: model (safetensors), tokenizer and the image preprocessing."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / PREPROCESSOR_FILE).write_text(json.dumps(self._preprocessor_config(), indent=2))
        return path

    def _preprocessor_config(self) -> dict[str, Any]:
        """``CLIPImageProcessor`` settings that reproduce ``pixel_values`` (resample 2 = bilinear)."""
        size = self.image_size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "resample": 2,
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    @classmethod
    def load(cls, folder: str | Path) -> RewardScorer:
        """Load a CLIP folder (ours or any local CLIP) with stock ``from_pretrained``; eval mode.

        Raises:
            ValueError: the folder is not a CLIP model folder, or holds no usable tokenizer.
        """
        from transformers import CLIPModel, CLIPTokenizer

        path = check_clip_folder(folder)
        model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path)
        # transformers 5 returns a 2-token tokenizer (every id unknown) for a folder without tokenizer
        # files instead of raising; scores from it would be silently meaningless.
        if len(tokenizer) <= 2:
            raise ValueError(f"reward backbone {str(path)!r}: no usable tokenizer files (got {len(tokenizer)} tokens)")
        mean, std = CLIP_MEAN, CLIP_STD
        preprocessor = path / PREPROCESSOR_FILE
        if preprocessor.is_file():
            settings = json.loads(preprocessor.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        return cls(model, tokenizer, image_mean=mean, image_std=std)


def freeze_all_but_last_layers(model: CLIPModel, n_layers: int) -> None:
    """Train only the projections, ``logit_scale`` and the last ``n_layers`` of each tower.

    HPSv2-style partial freezing (Wu et al. 2023, arXiv 2306.09341): with few labels, training the
    top of a pretrained CLIP keeps its general features. With ``n_layers`` ≥ 1 each tower's final norm
    (which sits on top of its last layer) trains too; ``n_layers`` = 0 is a linear probe of the projections.
    """
    if n_layers < 0:
        raise ValueError(f"freeze_backbone_except_last must be >= 0, got {n_layers}")
    model.requires_grad_(False)
    trainable: list[torch.nn.Module] = [model.text_projection, model.visual_projection]
    if n_layers > 0:
        trainable += list(model.text_model.encoder.layers[-n_layers:])
        trainable += list(model.vision_model.encoder.layers[-n_layers:])
        trainable += [model.text_model.final_layer_norm, model.vision_model.post_layernorm]
    for module in trainable:
        module.requires_grad_(True)
    model.logit_scale.requires_grad_(True)


def load_backbone(
    backbone: str | Path,
    *,
    tokenizer: CLIPTokenizer | None = None,
    image_size: int = 16,
    embed_dim: int = 64,
    seed: int = 0,
    freeze_backbone_except_last: int | None = None,
    tiny: dict[str, int] | None = None,
) -> RewardScorer:
    """The scorer to train: ``"tiny"`` (built from config) or a local CLIP folder, checked before training.

    Args:
        backbone: ``"tiny"`` or the path of a local CLIP folder (``RewardConfig.backbone``; never a hub id).
        tokenizer: required for ``"tiny"`` (the grammar's tokenizer); a folder brings its own.
        image_size, embed_dim, seed: tiny backbone only (see ``build_tiny_reward_model``).
        tiny: further ``build_tiny_reward_model`` options (width, vision_layers, patch_size).
        freeze_backbone_except_last: None trains everything; N freezes all but the projections,
            ``logit_scale`` and the last N layers of each tower.

    Returns:
        A ``RewardScorer`` in train mode.

    Raises:
        ValueError: the folder is missing, has no config.json or is not a CLIP model (named in the message),
            or ``"tiny"`` was asked for without a tokenizer.
    """
    if str(backbone) == "tiny":
        if tokenizer is None:
            raise ValueError("the tiny reward backbone needs the demo tokenizer (models.text.build_tokenizer)")
        model = build_tiny_reward_model(
            tokenizer, image_size=image_size, embed_dim=embed_dim, seed=seed, **(tiny or {})
        )
        scorer = RewardScorer(model, tokenizer)
    else:
        scorer = RewardScorer.load(backbone)
    if freeze_backbone_except_last is not None:
        freeze_all_but_last_layers(scorer.model, freeze_backbone_except_last)
    scorer.model.train()
    total = sum(p.numel() for p in scorer.model.parameters())
    trainable = sum(p.numel() for p in scorer.model.parameters() if p.requires_grad)
    log.info("reward backbone %s: %d parameters, %d trainable", backbone, total, trainable)
    return scorer
