"""Reward model: a CLIP-style dual encoder whose score is exp(logit_scale) · cos(text, image).

This is PickScore's (Kirstain et al. 2023) and HPSv2's (Wu et al. 2023) architecture: a stock
transformers ``CLIPModel``, so a trained reward model is a plain CLIP folder that
``CLIPModel.from_pretrained`` loads anywhere. On the demo world the backbone is a tiny CLIP built from
config with the grammar's word-level tokenizer; on real data it is a local CLIP folder (never a hub id).

Preprocessing is CLIP's own, written out so that it runs on uint8 images in DataLoader workers and the
float conversion happens one batch at a time on the device: the shorter side is resized to the folder's
``size.shortest_edge`` with its ``resample`` filter (PIL bicubic by default, as ``CLIPImageProcessor``),
the centre ``image_size`` square is cropped, pixels are scaled to [0, 1] and normalised with the folder's
``image_mean`` / ``image_std`` (CLIP's by default). The result equals ``CLIPImageProcessor``'s (the PIL
backend transformers uses without torchvision) to float rounding; an image already of the model's size
passes through untouched, so the demo's 16 px images never meet a filter.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
# PIL resampling codes as preprocessor_config.json stores them: CLIP resizes bicubic (3).
PIL_BILINEAR, PIL_BICUBIC = 2, 3
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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


def resize_image(
    image: np.ndarray, size: int, *, shortest_edge: int | None = None, resample: int = PIL_BICUBIC
) -> np.ndarray:
    """CLIP's resize and centre crop of a uint8 HWC image: the shorter side to ``shortest_edge`` (default
    ``size``) with PIL filter ``resample``, then the centre ``size`` × ``size`` square.

    The longer side is ``int(shortest_edge · long / short)``, truncated as ``CLIPImageProcessor`` computes it,
    so the crop takes the same pixels. An image already ``size`` square (with ``shortest_edge == size``) is
    returned as it is.
    """
    from PIL import Image

    shortest_edge = size if shortest_edge is None else shortest_edge
    if shortest_edge < size:
        raise ValueError(f"shortest_edge ({shortest_edge}) must be at least the crop size ({size})")
    height, width = image.shape[:2]
    if height == width == size == shortest_edge:
        return image
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    new_w, new_h = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    resized = image
    if (new_h, new_w) != (height, width):
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling(resample)))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


@dataclass(frozen=True)
class ImagePreprocessing:
    """The uint8 part of a scorer's preprocessing (resize + centre crop), picklable for DataLoader workers.

    Attributes:
        size: side of the square the vision tower takes (``crop_size``).
        shortest_edge: the shorter side is resized to this first (``size.shortest_edge``; >= ``size``).
        resample: PIL filter code (3 = bicubic, CLIP's).
    """

    size: int
    shortest_edge: int
    resample: int = PIL_BICUBIC

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)``."""
        return resize_image(image, self.size, shortest_edge=self.shortest_edge, resample=self.resample)


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
        shortest_edge: the shorter image side is resized to this before the centre crop (None: ``image_size``).
        resample: PIL filter of that resize (3 = bicubic, CLIP's).
        mixed_precision: "no", "bf16" or "fp16": the autocast of every forward on CUDA (``autocast``);
            the trainer sets it from ``reward.mixed_precision``. CPU always runs in float32.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        *,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        shortest_edge: int | None = None,
        resample: int = PIL_BICUBIC,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.shortest_edge = shortest_edge
        self.resample = int(resample)
        self.mixed_precision = "no"

    @property
    def image_size(self) -> int:
        """Side of the square images the vision tower takes."""
        return int(self.model.config.vision_config.image_size)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """Resize + centre crop to the vision tower's size, as a picklable callable on uint8 images."""
        size = self.image_size
        return ImagePreprocessing(size, self.shortest_edge or size, self.resample)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` in ``mixed_precision`` when the model is on CUDA; nothing otherwise."""
        dtype = AUTOCAST_DTYPES.get(self.mixed_precision)
        if dtype is None or self.device.type != "cuda":
            yield
            return
        with torch.autocast("cuda", dtype=dtype):
            yield

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_text_length(self) -> int:
        """Longest token sequence: the tokenizer's limit, bounded by the text tower's positions."""
        positions = int(self.model.config.text_config.max_position_embeddings)
        return min(int(self.tokenizer.model_max_length), positions)

    def tokenize(self, prompts: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` padded to the longest prompt, on ``device`` (None: the model's)."""
        encoded = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        target = self.device if device is None else device
        return encoded["input_ids"].to(target), encoded["attention_mask"].to(target)

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
        preprocessing = self.preprocessing
        side = preprocessing.size
        if images.shape[1:3] != (side, side) or preprocessing.shortest_edge != side:
            images = np.stack([preprocessing(img) for img in images])
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).contiguous()

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 ``(N, 3, S, S)`` -> float ``(N, 3, S, S)`` scaled to [0, 1] and normalised per channel."""
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-norm float32 text embeddings ``(N, D)``."""
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        # Under bf16 autocast the towers return bf16: norms and scores are taken in float32, where score
        # differences of a pair (what BT trains on) keep their digits. A no-op for float32 features.
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Unit-norm float32 image embeddings ``(N, D)``."""
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

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
                with self.autocast():
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
        """``CLIPImageProcessor`` settings that reproduce ``pixel_values``."""
        size = self.image_size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge or size},
            "resample": self.resample,
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
        scorer = cls(model, tokenizer)
        preprocessor = path / PREPROCESSOR_FILE
        if preprocessor.is_file():
            scorer._apply_preprocessor_config(preprocessor)
        return scorer

    def _apply_preprocessor_config(self, file: Path) -> None:
        """Take normalisation, resize and filter from a ``CLIPImageProcessor`` file; its crop must be the
        vision tower's size.

        Raises:
            ValueError: naming the file and key, for a crop other than ``image_size`` or a resize smaller
                than the crop.
        """
        settings = json.loads(file.read_text())
        self.image_mean = tuple(float(v) for v in settings.get("image_mean", CLIP_MEAN))
        self.image_std = tuple(float(v) for v in settings.get("image_std", CLIP_STD))
        self.resample = int(settings.get("resample", PIL_BICUBIC))
        size = self.image_size
        crop = _square_side(settings.get("crop_size", size), file, "crop_size")
        if settings.get("do_center_crop", True) and crop != size:
            raise ValueError(f"{file}: crop_size is {crop} but the vision tower takes {size} px images")
        resize = settings.get("size", size)
        if isinstance(resize, Mapping) and "shortest_edge" in resize:
            shortest_edge = int(resize["shortest_edge"])
        else:
            shortest_edge = _square_side(resize, file, "size")
        if shortest_edge < size:
            raise ValueError(f"{file}: size {shortest_edge} is smaller than the {size} px crop the model takes")
        self.shortest_edge = shortest_edge if settings.get("do_resize", True) else size


def _square_side(value: Any, file: Path, key: str) -> int:
    """A preprocessor size given as an int or a square ``{"height", "width"}``."""
    if isinstance(value, Mapping):
        if value.get("height") != value.get("width") or value.get("height") is None:
            raise ValueError(f"{file}: {key} {dict(value)} is not a square; CLIP crops square images")
        return int(value["height"])
    return int(value)


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
