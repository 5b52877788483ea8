"""Converters from the checkpoints judges are published as to the folders :mod:`prefalign.evaluation.judges` loads.

- HPS v2 / v2.1 (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``): an open_clip ViT-H-14 state dict becomes a
  transformers ``CLIPModel`` folder (``prefalign judge convert-hps``). open_clip itself cannot be installed here
  (it pulls in torchvision, which breaks the pinned CPU torch), so the key mapping is ours, checked against
  open_clip's ``VisionTransformer`` / ``TextTransformer`` and transformers' ``modeling_clip``:

  ===================================================  ======================================================
  open_clip                                            transformers CLIPModel
  ===================================================  ======================================================
  ``visual.conv1.weight``                              ``vision_model.embeddings.patch_embedding.weight``
  ``visual.class_embedding``                           ``vision_model.embeddings.class_embedding``
  ``visual.positional_embedding``                      ``vision_model.embeddings.position_embedding.weight``
  ``visual.ln_pre`` / ``visual.ln_post``               ``vision_model.pre_layrnorm`` / ``.post_layernorm``
  ``visual.proj`` (width, dim)                         ``visual_projection.weight`` (transposed)
  ``token_embedding.weight``                           ``text_model.embeddings.token_embedding.weight``
  ``positional_embedding``                             ``text_model.embeddings.position_embedding.weight``
  ``ln_final``                                         ``text_model.final_layer_norm``
  ``text_projection`` (width, dim)                     ``text_projection.weight`` (transposed)
  ``logit_scale``                                      ``logit_scale``
  ``[visual.]transformer.resblocks.{i}.ln_{1,2}``      ``{vision,text}_model.encoder.layers.{i}.layer_norm{1,2}``
  ``....attn.in_proj_weight`` / ``_bias`` (3·width)    ``....self_attn.{q,k,v}_proj`` (split in that order)
  ``....attn.out_proj``                                ``....self_attn.out_proj``
  ``....mlp.c_fc`` / ``mlp.c_proj``                    ``....mlp.fc1`` / ``mlp.fc2``
  ===================================================  ======================================================

  open_clip pools the text at ``argmax(token id)``, the end-of-text token only because it is the last id of
  CLIP's vocabulary; transformers pools at the first ``eos_token_id``. The converter therefore requires the
  tokenizer's end-of-text token to be its last id, where the two agree. ViT-H-14's towers use exact GELU
  (``hidden_act: gelu``), not OpenAI's quick_gelu.
- LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``): its MLP state dict becomes
  ``aesthetic_mlp.safetensors`` (``prefalign judge convert-aesthetic``).

Pickles are read with ``torch.load(weights_only=True)``: plain state dicts (tensors in dicts, lists and numbers)
load; a pickle that needs any other class to unpickle is refused rather than run. Weights are written with
safetensors only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefalign.evaluation.judges import AESTHETIC_FILE, PREPROCESSOR_FILE, aesthetic_mlp

log = logging.getLogger(__name__)

# open_clip's ViT-H-14 (model_configs/ViT-H-14.json: embed_dim 1024; vision width 1280, 32 layers, head_width 80,
# patch 14, image 224; text width 1024, 16 heads, 24 layers, context 77, vocab 49408; mlp_ratio 4) as CLIPConfig.
VIT_H_14 = {
    "vision_config": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "projection_dim": 1024,
}
# Parameters of one open_clip residual block -> its transformers CLIPEncoderLayer name (in_proj is split apart).
BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Buffers some open_clip versions store with the weights; they are recomputed, never learned.
IGNORED_KEYS = {"attn_mask", "visual.attn_mask"}
CONVERSION_FILE = "conversion.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A pickled state dict (or a checkpoint holding one under ``state_dict``), read with ``weights_only=True``.

    A ``module.`` prefix (saved from DistributedDataParallel) is dropped.

    Raises:
        ValueError: the file is missing, needs more than weights to unpickle, or holds no mapping of tensors.
    """
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a plain pickled state dict (torch.load weights_only=True refused: {first})"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)")
    if not_tensors := [k for k, v in loaded.items() if not isinstance(v, Tensor)]:
        raise ValueError(f"{path}: {not_tensors[0]!r} is not a tensor, so this is not a state dict")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def _block(state: Mapping[str, Tensor], src: str, dst: str, out: dict[str, Tensor]) -> set[str]:
    """Map one residual block ``src`` (open_clip) to ``dst`` (transformers); returns the source keys used."""
    used = set()
    for part in ("weight", "bias"):
        key = f"{src}.attn.in_proj_{part}"
        if key not in state:
            raise ValueError(f"missing {key}")
        # nn.MultiheadAttention stacks the query, key and value projections along dim 0, in that order.
        for name, tensor in zip(("q", "k", "v"), state[key].chunk(3, dim=0), strict=True):
            out[f"{dst}.self_attn.{name}_proj.{part}"] = tensor
        used.add(key)
        for open_name, hf_name in BLOCK_NAMES.items():
            key = f"{src}.{open_name}.{part}"
            if key not in state:
                raise ValueError(f"missing {key}")
            out[f"{dst}.{hf_name}.{part}"] = state[key]
            used.add(key)
    return used


def open_clip_to_clip_model(state: Mapping[str, Tensor], *, vision_layers: int, text_layers: int) -> dict[str, Tensor]:
    """Rename (and split, transpose) an open_clip CLIP state dict into a transformers ``CLIPModel`` state dict.

    Args:
        state: open_clip names (``visual.*``, ``transformer.resblocks.*``, ``token_embedding.weight``, ...).
        vision_layers, text_layers: Residual blocks of each tower.

    Returns:
        The ``CLIPModel`` state dict (tensors shared with ``state`` where only the name changes).

    Raises:
        ValueError: a key is missing, or keys are left over (attentional pooling, LayerScale, ``logit_bias``:
            architectures other than the plain CLIP ViT this maps).
    """
    direct = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    # open_clip multiplies x @ proj with proj (width, dim); nn.Linear keeps its weight as (dim, width).
    transposed = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
    out: dict[str, Tensor] = {}
    used = set(IGNORED_KEYS & set(state))
    for src, dst in (*direct.items(), *transposed.items()):
        if src not in state:
            raise ValueError(f"missing {src}")
        out[dst] = state[src].t() if src in transposed else state[src]
        used.add(src)
    for i in range(vision_layers):
        used |= _block(state, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out)
    for i in range(text_layers):
        used |= _block(state, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out)
    if extra := sorted(set(state) - used):
        raise ValueError(
            f"{len(extra)} keys this mapping does not know, e.g. {', '.join(extra[:3])} (more layers than the "
            "config, or not a plain open_clip CLIP ViT: attentional pooling, LayerScale, logit_bias)"
        )
    return out


def clip_config_dict(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ViT-H-14 as ``CLIPConfig`` keyword arguments, with ``overrides`` merged into each section."""
    merged: dict[str, Any] = copy.deepcopy(VIT_H_14)
    for key, value in (overrides or {}).items():
        if key not in merged:
            raise ValueError(f"config override {key!r}: expected text_config, vision_config or projection_dim")
        section = merged[key]
        if isinstance(section, dict):
            if not isinstance(value, Mapping):
                # A mistake in the --config file: reported as ValueError like every other one it can hold.
                raise ValueError(f"config override {key!r}: expected a mapping, got {value!r}")  # noqa: TRY004
            section.update(value)
        else:
            merged[key] = value
    return merged


def clip_preprocessor_config(image_size: int) -> dict[str, Any]:
    """CLIP's image preprocessing at ``image_size``: bicubic shortest side, centre crop, OpenAI CLIP mean/std."""
    from prefalign.models.reward_model import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL bicubic, as open_clip's Resize(BICUBIC)
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def _tokenizer(folder: Path):
    """The CLIP tokenizer of ``folder``, which must end its vocabulary with the end-of-text token."""
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise ValueError(f"--tokenizer {folder}: folder not found (a CLIP tokenizer folder, e.g. CLIP-ViT-H-14's)")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) <= 2:
        raise ValueError(f"--tokenizer {folder}: no usable tokenizer files (got {len(tokenizer)} tokens)")
    if tokenizer.eos_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"--tokenizer {folder}: end-of-text is id {tokenizer.eos_token_id}, not the last id {len(tokenizer) - 1}; "
            "open_clip pools the text at the highest id, so this is not the tokenizer the checkpoint was trained with"
        )
    return tokenizer


def convert_hps(
    checkpoint: Path, out_dir: Path, *, tokenizer_dir: Path, config_overrides: Mapping[str, Any] | None = None
) -> Path:
    """HPS v2 / v2.1 open_clip checkpoint -> a ``CLIPModel`` folder the ``hpsv2`` judge loads.

    Args:
        checkpoint: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (a pickled state dict).
        out_dir: The folder to write: ``config.json``, ``model.safetensors``, the tokenizer, CLIP-H's
            ``preprocessor_config.json`` and ``conversion.json`` (the source file and its sha256).
        tokenizer_dir: A CLIP tokenizer folder (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); copied.
        config_overrides: Sections merged into ViT-H-14's ``CLIPConfig`` (tests convert tiny towers).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: one line naming the checkpoint (or tokenizer) and the key or shape that does not fit.
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tokenizer(tokenizer_dir)
    state = read_state_dict(checkpoint)
    settings = clip_config_dict(config_overrides)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    settings["text_config"] = {**settings["text_config"], **special, "pad_token_id": tokenizer.pad_token_id}
    if len(tokenizer) > settings["text_config"]["vocab_size"]:
        raise ValueError(f"--tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, more than the model's vocabulary")
    config = CLIPConfig(**settings)
    try:
        mapped = open_clip_to_clip_model(
            state,
            vision_layers=config.vision_config.num_hidden_layers,
            text_layers=config.text_config.num_hidden_layers,
        )
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from None
    model = CLIPModel(config)
    for key, param in model.state_dict().items():
        if key not in mapped:
            raise ValueError(f"{checkpoint}: nothing maps to {key}")
        if mapped[key].shape != param.shape:
            raise ValueError(
                f"{checkpoint}: {key} has shape {tuple(mapped[key].shape)} in the checkpoint but "
                f"{tuple(param.shape)} in the config (pass --config for another architecture)"
            )
    model.load_state_dict(mapped, strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    image_size = int(config.vision_config.image_size)
    (out_dir / PREPROCESSOR_FILE).write_text(json.dumps(clip_preprocessor_config(image_size), indent=2))
    _write_provenance(out_dir, checkpoint, "open_clip CLIP ViT state dict (HPS v2)")
    log.info("converted %s to %s (%d tensors)", checkpoint, out_dir, len(mapped))
    return out_dir


def convert_aesthetic(source: Path, out_dir: Path) -> Path:
    """LAION aesthetic predictor v2 (``.pth`` state dict or ``.safetensors``) -> ``<out>/aesthetic_mlp.safetensors``.

    The ``aesthetic`` judge also needs the CLIP ViT-L/14 folder the MLP was trained on: put it in
    ``<out_dir>/clip`` or name it in the judge's ``clip_path``.

    Raises:
        ValueError: the file is not the aesthetic MLP (named key or shape).
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(source)) if source.suffix == ".safetensors" else read_state_dict(source)
    aesthetic_mlp(state, source=str(source))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(out_dir / AESTHETIC_FILE))
    _write_provenance(out_dir, source, "LAION aesthetic predictor v2 MLP state dict")
    return out_dir / AESTHETIC_FILE


def _write_provenance(out_dir: Path, source: Path, what: str) -> None:
    """``conversion.json``: which file (by content hash) the folder's weights came from."""
    record = {"source": source.name, "sha256": file_sha256(source), "format": what}
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
