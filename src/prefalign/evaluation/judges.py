"""Judges: frozen scorers of (prompt, image) pairs, which the evaluation treats alike.

Two are built in: ``oracle`` (the demo world's pixel oracle, demo only) and ``reward`` (the pipeline's own
reward model; it also chose DRO's expert demonstrations, so on real data it grades its own homework). The
others are configured in ``eval.judges``, each loaded from a local folder in the format its authors publish:

- ``clip_score``: a transformers ``CLIPModel`` folder. CLIPScore = ``100 · max(cos(text, image), 0)``, the
  scale torchmetrics reports; Hessel et al. 2021 write it with ``w = 2.5`` instead of 100, a constant factor
  that changes no win rate and no interval of one.
- ``pickscore``: PickScore_v1 (Kirstain et al. 2023), a ``CLIPModel`` folder with CLIP-H's tokenizer and
  processor files; score = ``exp(logit_scale) · cos(text, image)`` as in its model card.
- ``hpsv2``: HPS v2 / v2.1 (Wu et al. 2023), published as an open_clip ViT-H-14 checkpoint and converted to a
  ``CLIPModel`` folder by ``prefalign judge convert-hps`` (:mod:`prefalign.evaluation.judge_convert`);
  score = ``cos(text, image)``, what HPSv2's ``img_score.score`` returns (its benchmark tables print it × 100).
- ``aesthetic``: the LAION aesthetic predictor v2, an MLP over the L2-normalised CLIP ViT-L/14 image
  embedding (``aesthetic_mlp.safetensors``, written by ``prefalign judge convert-aesthetic``, plus a ``clip/``
  subfolder or ``clip_path``); it does not read the prompt.

Every judge is frozen (eval mode, ``requires_grad`` False) and scores in batches under ``torch.no_grad``, in
bf16 autocast on CUDA. Images go through each model's own preprocessing, read from its folder's
``preprocessor_config.json`` by transformers' PIL ``CLIPImageProcessor`` (resize of the shortest side, centre
crop, mean/std), pinned to the PIL backend so that installing torchvision cannot change a score.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from prefalign.config import JudgeConfig, PipelineConfig

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from prefalign.models.reward_model import RewardScorer

log = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=nn.Module)

CLIP_KINDS = ("clip_score", "pickscore", "hpsv2")
PREPROCESSOR_FILE = "preprocessor_config.json"
AESTHETIC_FILE = "aesthetic_mlp.safetensors"
# The published predictor is nn.Sequential(Linear, Dropout(.2), Linear, Dropout(.2), Linear, Dropout(.1),
# Linear, Linear): its state dict has weights at these indices only, and no activation between them.
AESTHETIC_LINEARS = (0, 2, 4, 6, 7)
AESTHETIC_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
# What each published folder lacks most often, said in the error that names the missing file.
FOLDER_HINTS = {
    "clip_score": "a transformers CLIPModel folder (config.json, model.safetensors, tokenizer, preprocessor)",
    "pickscore": "PickScore_v1 with the tokenizer and preprocessor_config.json of "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K copied into it",
    "hpsv2": "a folder written by `prefalign judge convert-hps CHECKPOINT OUT --tokenizer DIR`",
    "aesthetic": "a CLIP ViT-L/14 CLIPModel folder (openai/clip-vit-large-patch14)",
}


class Judge(Protocol):
    """A frozen scorer: one float per (prompt, image) pair, higher is better."""

    name: str
    kind: str

    def score(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` of ``prompts[i]`` with uint8 ``images[i]`` (``images`` is ``(N, H, W, 3)``)."""
        ...

    def to(self, device: torch.device | str) -> Judge:
        """Move the judge's weights (if any) to ``device``; returns the judge."""
        ...


def judge_device() -> torch.device:
    """Where judges score: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _freeze(model: ModuleT) -> ModuleT:
    model.eval()
    model.requires_grad_(False)
    return model


def _check_batch(name: str, prompts: Sequence[str], images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"judge {name!r}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"judge {name!r}: {len(prompts)} prompts but {len(images)} images")


# ------------------------------------------------------------------------------------------ built in
class OracleJudge:
    """The demo world's oracle (:func:`prefalign.world.oracle.oracle_scores`): the ground truth, demo only."""

    kind = "oracle"

    def __init__(self) -> None:
        self.name = "oracle"

    def to(self, device: torch.device | str) -> OracleJudge:
        return self  # pixels and a grammar: nothing to move

    def score(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        from prefalign.world.oracle import oracle_scores

        _check_batch(self.name, prompts, images)
        return oracle_scores(list(prompts), images)


class RewardJudge:
    """The pipeline's reward model (``paths.reward``) as a judge: ``exp(logit_scale) · cos(text, image)``."""

    kind = "reward"

    def __init__(self, scorer: RewardScorer, *, batch_size: int = 256) -> None:
        self.name = "reward"
        self.scorer = scorer
        self.batch_size = batch_size
        _freeze(scorer.model)

    @classmethod
    def load(cls, folder: Path, *, batch_size: int = 256) -> RewardJudge:
        """Load the trained reward model folder.

        Raises:
            ValueError: the folder is missing or not a CLIP folder with a tokenizer (named in the message).
        """
        from prefalign.models.reward_model import RewardScorer

        if not folder.is_dir():
            raise ValueError(f"judge 'reward': {folder}: no reward model folder (the train_reward stage writes it)")
        try:
            scorer = RewardScorer.load(folder)
        except ValueError as err:
            raise ValueError(f"judge 'reward': {err}") from None
        return cls(scorer, batch_size=batch_size)

    def to(self, device: torch.device | str) -> RewardJudge:
        self.scorer.model.to(device)
        return self

    def score(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        _check_batch(self.name, prompts, images)
        with torch.no_grad(), _autocast(self.scorer.device):
            return self.scorer.score(prompts, images, batch_size=self.batch_size)


# ------------------------------------------------------------------------------------------ folders
def _where(name: str, kind: str, folder: Path) -> str:
    return f"judge {name!r} ({kind}) folder {str(folder)!r}"


def check_clip_folder(name: str, kind: str, folder: Path, *, tokenizer: bool = True) -> Path:
    """Fail before any image is generated, naming the folder and what is missing, unless it is a CLIPModel folder.

    Args:
        name, kind: The judge, for the message.
        folder: The folder to check.
        tokenizer: Whether tokenizer files are required (the aesthetic judge reads no text).

    Returns:
        ``folder``.

    Raises:
        ValueError: one line naming the folder and the first thing missing or wrong.
    """
    where, hint = _where(name, kind, folder), FOLDER_HINTS[kind]
    if not folder.is_dir():
        raise ValueError(f"{where}: not found (expected {hint})")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{where}: no config.json, so not a saved transformers model (expected {hint})")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{where}: config.json is not a JSON object ({err})") from None
    if model_type != "clip":
        raise ValueError(f"{where}: config.json has model_type {model_type!r}, expected 'clip' (a CLIPModel)")
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{where}: no model.safetensors (weights load with safetensors only, never pickles)")
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise ValueError(f"{where}: no {PREPROCESSOR_FILE} (the model's image preprocessing; expected {hint})")
    if tokenizer and not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise ValueError(f"{where}: no tokenizer files (tokenizer.json or vocab.json + merges.txt; expected {hint})")
    return folder


def _load_clip(name: str, kind: str, folder: Path) -> tuple[CLIPModel, CLIPImageProcessorPil]:
    """The frozen ``CLIPModel`` of a checked folder and its image processor, whose crop must fit the vision tower."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    model = _freeze(CLIPModel.from_pretrained(folder, use_safetensors=True))
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    crop = processor.crop_size if processor.do_center_crop else processor.size
    side = int(model.config.vision_config.image_size)
    if (crop.get("height"), crop.get("width")) != (side, side):
        raise ValueError(
            f"{_where(name, kind, folder)}: {PREPROCESSOR_FILE} makes {crop.get('height')}x{crop.get('width')} "
            f"images but the vision tower takes {side}x{side}"
        )
    return model, processor


def _pixel_values(processor: CLIPImageProcessorPil, images: np.ndarray, device: torch.device) -> Tensor:
    """uint8 ``(N, H, W, 3)`` -> the model's normalised ``(N, 3, S, S)`` input on ``device``."""
    # channels_last said outright: a 3-pixel-wide image would otherwise be read as channels-first.
    batch = processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
    return batch["pixel_values"].to(device)


def _unit(features: Tensor) -> Tensor:
    return nn.functional.normalize(features.float(), dim=-1)


# ------------------------------------------------------------------------------------------ CLIP family
class ClipJudge:
    """CLIPScore, PickScore or HPSv2: a frozen ``CLIPModel``, its tokenizer and its image processor.

    Attributes:
        name: The judge's name in ``eval.judges``.
        kind: ``clip_score`` (100 · max(cos, 0)), ``pickscore`` (exp(logit_scale) · cos) or ``hpsv2`` (cos).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        processor: CLIPImageProcessorPil,
        *,
        batch_size: int = 256,
    ) -> None:
        if kind not in CLIP_KINDS:
            raise ValueError(f"judge {name!r}: kind {kind!r} is not one of {', '.join(CLIP_KINDS)}")
        self.name, self.kind = name, kind
        self.model = _freeze(model)
        self.tokenizer, self.processor, self.batch_size = tokenizer, processor, batch_size

    @classmethod
    def load(cls, name: str, kind: str, folder: Path, *, batch_size: int = 256) -> ClipJudge:
        """Load a checked CLIPModel folder with its tokenizer and preprocessing.

        Raises:
            ValueError: the folder is not a CLIPModel folder with weights, tokenizer and preprocessor config.
        """
        from transformers import CLIPTokenizer

        check_clip_folder(name, kind, folder)
        model, processor = _load_clip(name, kind, folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        # transformers 5 returns a 2-token tokenizer for unreadable files instead of raising: every prompt
        # would read as unknown tokens and the scores would mean nothing.
        if len(tokenizer) <= 2:
            raise ValueError(f"{_where(name, kind, folder)}: tokenizer files hold {len(tokenizer)} tokens")
        return cls(name, kind, model, tokenizer, processor, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClipJudge:
        self.model.to(device)
        return self

    def embeddings(self, prompts: Sequence[str], images: np.ndarray) -> tuple[Tensor, Tensor]:
        """Unit-norm float32 text and image embeddings ``(N, D)`` of one batch, under no_grad."""
        limit = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        device = self.device
        with torch.no_grad(), _autocast(device):
            text = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            ).pooler_output
            image = self.model.get_image_features(
                pixel_values=_pixel_values(self.processor, images, device)
            ).pooler_output
        return _unit(text), _unit(image)

    def from_cosine(self, cosine: Tensor) -> Tensor:
        """The published score of each pair from its cosine similarity."""
        if self.kind == "clip_score":
            return 100.0 * cosine.clamp(min=0.0)
        if self.kind == "pickscore":
            return self.model.logit_scale.detach().float().exp() * cosine
        return cosine  # hpsv2: the diagonal of image_features @ text_features.T, both unit-norm

    def score(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        _check_batch(self.name, prompts, images)
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            text, image = self.embeddings(
                prompts[start : start + self.batch_size], images[start : start + self.batch_size]
            )
            chunks.append(self.from_cosine((text * image).sum(dim=-1)).cpu())
        return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


# ------------------------------------------------------------------------------------------ aesthetic
def aesthetic_mlp(state: Mapping[str, Tensor], *, source: str, in_features: int | None = None) -> nn.Sequential:
    """The LAION aesthetic predictor v2 MLP from its state dict, checked key by key and shape by shape.

    Args:
        state: ``layers.{0,2,4,6,7}.{weight,bias}`` (the published ``sac+logos+ava1-l14-linearMSE.pth`` keys;
            widths 768 -> 1024 -> 128 -> 64 -> 16 -> 1 there, any chain of widths ending in 1 here).
        source: The file, for the message.
        in_features: The CLIP embedding width it must take (768 for ViT-L/14); None skips that check.

    Returns:
        The frozen ``nn.Sequential`` (dropouts inactive in eval mode).

    Raises:
        ValueError: one line naming ``source`` and the missing or unexpected key, or the shape that breaks the chain.
    """
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LINEARS for p in ("weight", "bias")}
    if missing := sorted(expected - set(state)):
        raise ValueError(f"{source}: not the LAION aesthetic MLP, missing {', '.join(missing)}")
    if unexpected := sorted(set(state) - expected):
        raise ValueError(f"{source}: not the LAION aesthetic MLP, unexpected {', '.join(unexpected[:5])}")
    width = in_features
    layers: list[nn.Module] = []
    for i in range(AESTHETIC_LINEARS[-1] + 1):
        if i in AESTHETIC_DROPOUTS:
            layers.append(nn.Dropout(AESTHETIC_DROPOUTS[i]))
            continue
        weight, bias = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"{source}: layers.{i} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}")
        if width is not None and weight.shape[1] != width:
            what = "the CLIP image embedding" if i == 0 else f"the layer before ({width} outputs)"
            raise ValueError(f"{source}: layers.{i} takes {weight.shape[1]} inputs but {what} has {width}")
        width = int(weight.shape[0])
        layers.append(nn.Linear(int(weight.shape[1]), width))
    if width != 1:
        raise ValueError(f"{source}: layers.{AESTHETIC_LINEARS[-1]} gives {width} outputs, expected 1 (a score)")
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    return _freeze(mlp)


class AestheticJudge:
    """LAION aesthetic predictor v2: MLP(normalise(CLIP image embedding)); the prompt is not read."""

    kind = "aesthetic"

    def __init__(
        self,
        name: str,
        mlp: nn.Sequential,
        model: CLIPModel,
        processor: CLIPImageProcessorPil,
        *,
        batch_size: int = 256,
    ) -> None:
        self.name = name
        self.mlp, self.model = _freeze(mlp), _freeze(model)
        self.processor, self.batch_size = processor, batch_size

    @classmethod
    def load(cls, name: str, path: Path, clip_path: Path | None = None, *, batch_size: int = 256) -> AestheticJudge:
        """Load ``aesthetic_mlp.safetensors`` (``path`` is its folder or the file) and the CLIP folder.

        Args:
            name: The judge's name.
            path: A folder holding ``aesthetic_mlp.safetensors``, or a ``.safetensors`` file of the MLP.
            clip_path: The CLIP ViT-L/14 folder; None: ``<path>/clip`` (``path`` a folder).
            batch_size: Images per forward pass.

        Raises:
            ValueError: the MLP file or CLIP folder is missing or malformed, or their widths disagree.
        """
        from safetensors.torch import load_file

        mlp_file = path if path.suffix == ".safetensors" else path / AESTHETIC_FILE
        if not mlp_file.is_file():
            raise ValueError(
                f"judge {name!r} (aesthetic) folder {str(path)!r}: no {AESTHETIC_FILE} "
                "(write it with `prefalign judge convert-aesthetic PTH OUT`)"
            )
        clip_folder = clip_path if clip_path is not None else (path if path.is_dir() else path.parent) / "clip"
        check_clip_folder(name, "aesthetic", clip_folder, tokenizer=False)
        model, processor = _load_clip(name, "aesthetic", clip_folder)
        mlp = aesthetic_mlp(load_file(str(mlp_file)), source=str(mlp_file), in_features=model.config.projection_dim)
        return cls(name, mlp, model, processor, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> AestheticJudge:
        self.model.to(device)
        self.mlp.to(device)
        return self

    def score(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        _check_batch(self.name, prompts, images)
        device, chunks = self.device, []
        for start in range(0, len(images), self.batch_size):
            pixels = _pixel_values(self.processor, images[start : start + self.batch_size], device)
            with torch.no_grad(), _autocast(device):
                embedding = _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)
                chunks.append(self.mlp(embedding).float().squeeze(-1).cpu())
        return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


# ------------------------------------------------------------------------------------------ from config
def load_judge(name: str, spec: JudgeConfig, *, root: Path, batch_size: int = 256) -> Judge:
    """One configured judge; ``spec.path`` and ``spec.clip_path`` are relative to ``root`` (the params folder).

    Raises:
        ValueError: its folder is in the wrong format (named in the message).
    """
    path = (root / spec.path).resolve()
    if spec.kind == "aesthetic":
        clip_path = (root / spec.clip_path).resolve() if spec.clip_path else None
        return AestheticJudge.load(name, path, clip_path, batch_size=batch_size)
    return ClipJudge.load(name, spec.kind, path, batch_size=batch_size)


def check_judge_choice(cfg: PipelineConfig) -> None:
    """The deciding judge exists for this preset: the oracle scores the demo world only.

    Raises:
        ValueError: ``eval.judge`` is ``oracle`` and ``model.preset`` is not ``demo``.
    """
    if cfg.eval.judge == "oracle" and cfg.model.preset != "demo":
        raise ValueError(
            f"eval.judge is 'oracle' but model.preset is {cfg.model.preset!r}: the oracle scores the demo world "
            "only; set eval.judge to reward or a name of eval.judges"
        )


def load_judges(cfg: PipelineConfig) -> list[Judge]:
    """Every judge of the evaluation, loaded (on the CPU) before any image is generated.

    ``reward`` always, ``oracle`` on the demo world, then each of ``eval.judges`` in config order.

    Raises:
        ValueError: ``eval.judge`` cannot decide on this preset, or a judge's folder is in the wrong format.
    """
    check_judge_choice(cfg)
    batch_size, root = cfg.eval.judge_batch_size, Path(cfg.paths.root)
    judges: list[Judge] = [RewardJudge.load(cfg.paths.resolve("reward"), batch_size=batch_size)]
    if cfg.model.preset == "demo":
        judges.append(OracleJudge())
    for name, spec in cfg.eval.judges.items():
        judges.append(load_judge(name, spec, root=root, batch_size=batch_size))
    log.info("judges: %s (deciding: %s)", ", ".join(f"{j.name} ({j.kind})" for j in judges), cfg.eval.judge)
    return judges


def judge_descriptions(cfg: PipelineConfig) -> dict[str, dict[str, str]]:
    """``eval.json``'s ``judges``: each judge's kind and folder as configured (relative, so the report is portable)."""
    out = {"reward": {"kind": "reward", "path": cfg.paths.reward}}
    if cfg.model.preset == "demo":
        out["oracle"] = {"kind": "oracle"}
    for name, spec in cfg.eval.judges.items():
        out[name] = {"kind": spec.kind, "path": spec.path}
        if spec.clip_path:
            out[name]["clip_path"] = spec.clip_path
    return out
