"""Independent judges: the HPS v2 converter's key mapping, each judge's score formula, preprocessing, freezing,
and the one-line errors for folders in the wrong format.

The converter is checked the way that shows the mapping is right: a tiny open_clip-shaped state dict (random
tensors of the right shapes, written by hand) is converted, loaded through the real loader, and its image and text
embeddings are compared with a forward pass written here in plain torch ops after open_clip's computation.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefalign.config import ConfigError, JudgeConfig, PipelineConfig, load_config
from prefalign.evaluation.judge_convert import convert_aesthetic, convert_hps
from prefalign.evaluation.judges import (
    AestheticJudge,
    ClipJudge,
    OracleJudge,
    RewardJudge,
    check_judge_choice,
    load_judge,
    load_judges,
)

IMAGE, PATCH, VISION_WIDTH, VISION_LAYERS, HEADS = 16, 4, 48, 2, 4
TEXT_WIDTH, TEXT_LAYERS, CONTEXT, EMBED = 32, 2, 16, 24
PROMPTS = ["a red circle", "a small blue square at the top left", "x", "a green triangle on a white background"]


def _tiny_config(vocab_size: int) -> dict:
    """CLIPConfig sections of the tiny towers; widths differ so that a vision/text mix-up cannot fit."""
    return {
        "vision_config": {
            "image_size": IMAGE,
            "patch_size": PATCH,
            "hidden_size": VISION_WIDTH,
            "intermediate_size": 4 * VISION_WIDTH,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": HEADS,
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": HEADS,
            "max_position_embeddings": CONTEXT,
        },
        "projection_dim": EMBED,
    }


def _blocks(generator: torch.Generator, prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    out = {}
    for i in range(layers):
        b = f"{prefix}.resblocks.{i}"
        for norm in ("ln_1", "ln_2"):
            out[f"{b}.{norm}.weight"] = 1 + randn(width, scale=0.2)
            out[f"{b}.{norm}.bias"] = randn(width, scale=0.2)
        out[f"{b}.attn.in_proj_weight"] = randn(3 * width, width, scale=width**-0.5)
        out[f"{b}.attn.in_proj_bias"] = randn(3 * width, scale=0.2)
        out[f"{b}.attn.out_proj.weight"] = randn(width, width, scale=width**-0.5)
        out[f"{b}.attn.out_proj.bias"] = randn(width, scale=0.2)
        out[f"{b}.mlp.c_fc.weight"] = randn(4 * width, width, scale=width**-0.5)
        out[f"{b}.mlp.c_fc.bias"] = randn(4 * width, scale=0.2)
        out[f"{b}.mlp.c_proj.weight"] = randn(width, 4 * width, scale=(4 * width) ** -0.5)
        out[f"{b}.mlp.c_proj.bias"] = randn(width, scale=0.2)
    return out


def open_clip_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An open_clip CLIP ViT state dict of the tiny config: open_clip's key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    grid = (IMAGE // PATCH) ** 2
    state = {
        "visual.conv1.weight": randn(VISION_WIDTH, 3, PATCH, PATCH, scale=0.2),
        "visual.class_embedding": randn(VISION_WIDTH, scale=0.5),
        "visual.positional_embedding": randn(grid + 1, VISION_WIDTH, scale=0.5),
        "visual.ln_pre.weight": 1 + randn(VISION_WIDTH, scale=0.2),
        "visual.ln_pre.bias": randn(VISION_WIDTH, scale=0.2),
        "visual.ln_post.weight": 1 + randn(VISION_WIDTH, scale=0.2),
        "visual.ln_post.bias": randn(VISION_WIDTH, scale=0.2),
        "visual.proj": randn(VISION_WIDTH, EMBED, scale=VISION_WIDTH**-0.5),
        "token_embedding.weight": randn(vocab_size, TEXT_WIDTH, scale=0.5),
        "positional_embedding": randn(CONTEXT, TEXT_WIDTH, scale=0.5),
        "ln_final.weight": 1 + randn(TEXT_WIDTH, scale=0.2),
        "ln_final.bias": randn(TEXT_WIDTH, scale=0.2),
        "text_projection": randn(TEXT_WIDTH, EMBED, scale=TEXT_WIDTH**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    state |= _blocks(g, "visual.transformer", VISION_WIDTH, VISION_LAYERS)
    state |= _blocks(g, "transformer", TEXT_WIDTH, TEXT_LAYERS)
    return state


# ------------------------------------------------------------------ open_clip's forward, in plain torch ops
def _ln(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-5)


def _attention(x: torch.Tensor, state: dict, key: str, mask: torch.Tensor | None) -> torch.Tensor:
    """nn.MultiheadAttention with its packed in_proj: q, k, v are the three row blocks, in that order."""
    n, length, width = x.shape
    q, k, v = F.linear(x, state[f"{key}.in_proj_weight"], state[f"{key}.in_proj_bias"]).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, length, HEADS, width // HEADS).transpose(1, 2)

    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(width // HEADS)
    if mask is not None:
        logits = logits + mask
    mixed = (logits.softmax(dim=-1) @ heads(v)).transpose(1, 2).reshape(n, length, width)
    return F.linear(mixed, state[f"{key}.out_proj.weight"], state[f"{key}.out_proj.bias"])


def _transformer(x: torch.Tensor, state: dict, prefix: str, layers: int, mask=None) -> torch.Tensor:
    for i in range(layers):
        b = f"{prefix}.resblocks.{i}"
        x = x + _attention(_ln(x, state, f"{b}.ln_1"), state, f"{b}.attn", mask)
        hidden = F.gelu(
            F.linear(_ln(x, state, f"{b}.ln_2"), state[f"{b}.mlp.c_fc.weight"], state[f"{b}.mlp.c_fc.bias"])
        )
        x = x + F.linear(hidden, state[f"{b}.mlp.c_proj.weight"], state[f"{b}.mlp.c_proj.bias"])
    return x


def reference_image_features(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer: patches, class token, positions, ln_pre, blocks, ln_post, token 0 @ proj."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1)
    x = _ln(x + state["visual.positional_embedding"], state, "visual.ln_pre")
    x = _ln(_transformer(x, state, "visual.transformer", VISION_LAYERS), state, "visual.ln_post")
    return x[:, 0] @ state["visual.proj"]


def reference_text_features(state: dict, ids: torch.Tensor) -> torch.Tensor:
    """open_clip text tower: causal blocks, ln_final, the highest token id's position (argmax) @ text_projection."""
    length = ids.shape[1]
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = _ln(_transformer(x, state, "transformer", TEXT_LAYERS, causal), state, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ state["text_projection"]


# ------------------------------------------------------------------------------------------ fixtures
def save_char_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer over single byte-level characters whose end-of-text token is its last id (as CLIP's)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(the open_clip state dict, the converted HPS folder, the tokenizer folder, the --config file)."""
    root = tmp_path_factory.mktemp("hps")
    tokenizer_dir = save_char_tokenizer(root / "tokenizer")
    vocab_size = 514
    state = open_clip_state(vocab_size)
    checkpoint = root / "HPS_v2_compressed.pt"
    # As published: a checkpoint dict with the weights under "state_dict" (half precision in the real file).
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in state.items()}, "epoch": 3}, checkpoint)
    config_file = root / "tiny_config.json"
    config_file.write_text(json.dumps(_tiny_config(vocab_size)))
    out = convert_hps(checkpoint, root / "hps", tokenizer_dir=tokenizer_dir, config_overrides=_tiny_config(vocab_size))
    halved = {k: v.half().float() for k, v in state.items()}  # the values the converter saw
    return halved, out, tokenizer_dir, config_file, checkpoint


def uint8_images(n: int, height: int = IMAGE, width: int = IMAGE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ converter
def test_converted_hps_embeddings_equal_open_clips_forward(converted):
    from transformers import CLIPModel

    state, folder, *_ = converted
    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    assert model.config.text_config.hidden_act == model.config.vision_config.hidden_act == "gelu"
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    # sot, random characters, eot (the highest id) at a different place per row, then open_clip's zero padding.
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, end in enumerate((5, CONTEXT - 1, 2)):
        ids[row, 0] = 512
        ids[row, 1:end] = torch.randint(0, 512, (end - 1,), generator=torch.Generator().manual_seed(row))
        ids[row, end] = 513
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(image, reference_image_features(state, pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text, reference_text_features(state, ids), atol=1e-5, rtol=1e-4)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-2)


def test_converted_folder_has_clip_h_preprocessing_and_provenance(converted):
    _, folder, *_, checkpoint = converted
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert settings["resample"] == 3 and settings["crop_size"] == {"height": IMAGE, "width": IMAGE}
    assert settings["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    provenance = json.loads((folder / "conversion.json").read_text())
    assert provenance["source"] == checkpoint.name and len(provenance["sha256"]) == 64


def test_hps_judge_scores_the_cosine_of_open_clips_embeddings(converted):
    state, folder, *_ = converted
    judge = load_judge("hps", JudgeConfig(kind="hpsv2", path=str(folder)), root=Path("/"), batch_size=3)
    images = uint8_images(len(PROMPTS), 20, 26)  # not square, not the model's size: resize + centre crop
    scores = judge.score(PROMPTS, images)
    pixels = judge.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
    # Truncated to the 16 positions of the tiny text tower, end-of-text kept last, as the judge tokenizes.
    ids = judge.tokenizer(PROMPTS, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == CONTEXT and (ids.max(dim=1).values == 513).all()
    image = F.normalize(reference_image_features(state, pixels["pixel_values"]), dim=-1)
    text = F.normalize(reference_text_features(state, ids), dim=-1)
    np.testing.assert_allclose(scores, (image * text).sum(-1).numpy(), atol=1e-5)
    assert scores.dtype == np.float32 and scores.shape == (len(PROMPTS),)


def test_the_clip_family_formulas(converted):
    _, folder, *_ = converted
    images = uint8_images(len(PROMPTS), seed=4)
    hps, clip, pick = (ClipJudge.load(kind, kind, folder) for kind in ("hpsv2", "clip_score", "pickscore"))
    cosine = hps.score(PROMPTS, images)
    assert np.all(np.abs(cosine) <= 1 + 1e-6) and (cosine < 0).any() and (cosine > 0).any()
    np.testing.assert_allclose(clip.score(PROMPTS, images), 100 * np.maximum(cosine, 0), atol=1e-4)
    scale = np.exp(pick.model.logit_scale.item())
    assert scale == pytest.approx(1 / 0.07, rel=1e-2)
    np.testing.assert_allclose(pick.score(PROMPTS, images), scale * cosine, rtol=1e-5, atol=1e-6)


def test_images_get_the_models_own_preprocessing(converted):
    """Bicubic resize of the shortest side, centre crop, CLIP mean/std, as CLIP's processor does with PIL."""
    from PIL import Image

    from prefalign.evaluation.judges import _pixel_values

    _, folder, *_ = converted
    judge = ClipJudge.load("hps", "hpsv2", folder)
    images = uint8_images(2, 24, 30, seed=2)
    got = _pixel_values(judge.processor, images, torch.device("cpu")).numpy()
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    for image, pixels in zip(images, got, strict=True):
        resized = np.asarray(Image.fromarray(image).resize((20, 16), Image.Resampling.BICUBIC), np.float64)
        expected = (resized[:, 2:18] / 255 - mean) / std
        np.testing.assert_allclose(pixels, expected.transpose(2, 0, 1), atol=1e-5)


def test_convert_hps_cli_and_its_errors(converted, tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    _, folder, tokenizer_dir, config_file, checkpoint = converted
    args = ["judge", "convert-hps", str(checkpoint), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]
    result = CliRunner().invoke(app, [*args, "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    # Without --config the checkpoint is read as ViT-H-14 (32 vision layers): the first missing key is named.
    result = CliRunner().invoke(app, [*args[:3], str(tmp_path / "other"), *args[4:]])
    assert result.exit_code == 2
    assert f"{checkpoint}: missing visual.transformer.resblocks.2.attn.in_proj_weight" in result.output
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.update({"visual.attn_pool.query": torch.zeros(2, 2)}),
            r"does not know, e\.g\. visual\.attn_pool",
        ),
        (lambda s: s.pop("visual.ln_pre.bias"), r"missing visual\.ln_pre\.bias"),
        (lambda s: s.pop("transformer.resblocks.1.attn.in_proj_weight"), r"missing transformer\.resblocks\.1\.attn"),
        (lambda s: s.update({"text_projection": torch.zeros(TEXT_WIDTH, EMBED + 1)}), r"text_projection\.weight has"),
    ],
)
def test_convert_hps_names_the_key_that_does_not_fit(tmp_path, converted, change, message):
    *_, tokenizer_dir, _, _ = converted
    state = open_clip_state(514)
    change(state)
    checkpoint = tmp_path / "bad.pt"
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=message) as err:
        convert_hps(checkpoint, tmp_path / "out", tokenizer_dir=tokenizer_dir, config_overrides=_tiny_config(514))
    assert str(checkpoint) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


class NotWeights:
    """Anything a weights-only unpickler must refuse to build."""


def test_convert_hps_refuses_pickles_that_are_not_plain_weights(tmp_path, converted):
    *_, tokenizer_dir, _, _ = converted
    checkpoint = tmp_path / "code.pt"
    torch.save({"state_dict": open_clip_state(514), "extra": NotWeights()}, checkpoint)
    with pytest.raises(ValueError, match=r"code\.pt: not a plain pickled state dict \(torch\.load weights_only"):
        convert_hps(checkpoint, tmp_path / "out", tokenizer_dir=tokenizer_dir, config_overrides=_tiny_config(514))


def test_convert_hps_refuses_a_tokenizer_whose_end_of_text_is_not_the_last_id(tmp_path, converted):
    from transformers import CLIPTokenizer

    *_, checkpoint = converted
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"end-of-text is id 1, not the last id 3"):
        convert_hps(checkpoint, tmp_path / "out", tokenizer_dir=tmp_path / "tok", config_overrides=_tiny_config(514))


# ------------------------------------------------------------------------------------------ aesthetic
AESTHETIC_WIDTHS = (EMBED, 40, 20, 12, 6, 1)


def aesthetic_state(widths=AESTHETIC_WIDTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def test_aesthetic_judge_is_the_mlp_over_the_normalised_clip_embedding(tmp_path, converted):
    state, folder, *_ = converted
    mlp_state = aesthetic_state()
    torch.save(mlp_state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    out = tmp_path / "aesthetic"
    convert_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", out)
    shutil.copytree(folder, out / "clip")
    judge = load_judge("aesthetic", JudgeConfig(kind="aesthetic", path="aesthetic"), root=tmp_path)
    images = uint8_images(3, seed=5)
    scores = judge.score(["ignored"] * 3, images)
    pixels = judge.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
    x = F.normalize(reference_image_features(state, pixels["pixel_values"]), dim=-1)
    for index in (0, 2, 4, 6, 7):  # no activation between the published layers
        x = F.linear(x, mlp_state[f"layers.{index}.weight"], mlp_state[f"layers.{index}.bias"])
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), atol=1e-5)
    # The same MLP as a safetensors file, with the CLIP folder named by clip_path.
    again = load_judge(
        "a2",
        JudgeConfig(kind="aesthetic", path="aesthetic/aesthetic_mlp.safetensors", clip_path="aesthetic/clip"),
        root=tmp_path,
    )
    np.testing.assert_array_equal(again.score(["x"] * 3, images), scores)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (aesthetic_state(widths=(EMBED + 1, 40, 20, 12, 6, 1)), r"layers\.0 takes 25 inputs but the CLIP image"),
        (aesthetic_state(widths=(EMBED, 40, 20, 12, 6, 2)), r"layers\.7 gives 2 outputs, expected 1"),
        ({k: v for k, v in aesthetic_state().items() if k != "layers.4.bias"}, r"missing layers\.4\.bias"),
        (
            {**aesthetic_state(), "layers.2.weight": torch.zeros(20, 39)},
            r"layers\.2 takes 39 inputs but the layer before \(40 outputs\)",
        ),
    ],
)
def test_aesthetic_mlp_of_the_wrong_shape_is_named(tmp_path, converted, state, message):
    from safetensors.torch import save_file

    _, folder, *_ = converted
    (tmp_path / "judge").mkdir()
    save_file(state, str(tmp_path / "judge/aesthetic_mlp.safetensors"))
    with pytest.raises(ValueError, match=message) as err:
        AestheticJudge.load("aes", tmp_path / "judge", folder)
    assert "aesthetic_mlp.safetensors" in str(err.value)


# ------------------------------------------------------------------------------------------ folders
@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda f: shutil.rmtree(f), r"not found \(expected a folder written by `prefalign judge convert-hps"),
        (lambda f: (f / "config.json").unlink(), r"no config\.json, so not a saved transformers model"),
        (lambda f: (f / "config.json").write_text('{"model_type": "bert"}'), r"model_type 'bert', expected 'clip'"),
        (lambda f: (f / "model.safetensors").unlink(), r"no model\.safetensors \(weights load with safetensors"),
        (lambda f: (f / "preprocessor_config.json").unlink(), r"no preprocessor_config\.json"),
        (lambda f: (f / "tokenizer.json").unlink(), r"no tokenizer files"),
    ],
)
def test_a_folder_in_the_wrong_format_is_one_line_naming_it(tmp_path, converted, spoil, message):
    _, folder, *_ = converted
    copy = tmp_path / "judge"
    shutil.copytree(folder, copy)
    spoil(copy)
    with pytest.raises(ValueError, match=message) as err:
        load_judge("hps", JudgeConfig(kind="hpsv2", path="judge"), root=tmp_path)
    assert f"judge 'hps' (hpsv2) folder '{copy.resolve()}'" in str(err.value) and "\n" not in str(err.value)


def test_a_crop_that_does_not_fit_the_vision_tower_is_named(tmp_path, converted):
    _, folder, *_ = converted
    shutil.copytree(folder, tmp_path / "judge")
    settings = json.loads((tmp_path / "judge/preprocessor_config.json").read_text())
    settings["crop_size"] = {"height": 24, "width": 24}
    (tmp_path / "judge/preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"makes 24x24 images but the vision tower takes 16x16"):
        ClipJudge.load("hps", "hpsv2", tmp_path / "judge")


# ------------------------------------------------------------------------------------------ frozen, built in
def save_tiny_reward(folder: Path, seed: int = 0) -> Path:
    from prefalign.models.reward_model import RewardScorer, build_tiny_reward_model
    from prefalign.models.text import build_tokenizer

    tokenizer = build_tokenizer(
        ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large"], max_length=16
    )
    RewardScorer(
        build_tiny_reward_model(tokenizer, embed_dim=16, width=32, vision_layers=1, seed=seed), tokenizer
    ).save(folder)
    return folder


def test_every_judge_is_frozen_and_scores_without_gradients(tmp_path, converted):
    _, folder, *_ = converted
    judges = [
        ClipJudge.load("c", "clip_score", folder),
        RewardJudge.load(save_tiny_reward(tmp_path / "reward")),
    ]
    for judge in judges:
        model = judge.model if isinstance(judge, ClipJudge) else judge.scorer.model
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        with torch.enable_grad():
            scores = judge.score(PROMPTS, uint8_images(len(PROMPTS)))
        assert isinstance(scores, np.ndarray) and np.isfinite(scores).all()


def test_builtin_judges_score_as_before(tmp_path):
    """The demo's numbers: the reward judge is RewardScorer.score, the oracle judge is oracle_scores, exactly."""
    from prefalign.models.reward_model import RewardScorer
    from prefalign.world.grammar import all_attributes, prompt_of
    from prefalign.world.oracle import oracle_scores
    from prefalign.world.render import render

    prompts = [prompt_of(a) for a in list(all_attributes())[:6]]
    images = np.stack([render(a, 16) for a in list(all_attributes())[:6]])
    folder = save_tiny_reward(tmp_path / "reward")
    np.testing.assert_array_equal(
        RewardJudge.load(folder).score(prompts, images), RewardScorer.load(folder).score(prompts, images)
    )
    np.testing.assert_array_equal(OracleJudge().score(prompts, images), oracle_scores(prompts, images))
    with pytest.raises(ValueError, match=r"judge 'oracle': images must be uint8 \(N, H, W, 3\)"):
        OracleJudge().score(prompts, images.astype(np.float32))
    with pytest.raises(ValueError, match=r"judge 'reward': .*no reward model folder"):
        RewardJudge.load(tmp_path / "none")


# ------------------------------------------------------------------------------------------ config
def test_load_judges_resolves_paths_from_the_params_folder(tmp_path, converted):
    _, folder, *_ = converted
    shutil.copytree(folder, tmp_path / "weights/hps")
    save_tiny_reward(tmp_path / "models/reward")
    (tmp_path / "params.yaml").write_text(
        "eval:\n  judge: hps\n  judges:\n    hps: {kind: hpsv2, path: weights/hps}\n"
        "    clip: {kind: clip_score, path: weights/hps}\n"
    )
    cfg = load_config(tmp_path / "params.yaml")
    judges = load_judges(cfg)
    assert [(j.name, j.kind) for j in judges] == [
        ("reward", "reward"),
        ("oracle", "oracle"),
        ("hps", "hpsv2"),
        ("clip", "clip_score"),
    ]


@pytest.mark.parametrize(
    ("eval_section", "message"),
    [
        ("judge: pick", r"eval\.judge is 'pick': neither a built-in judge \(oracle, reward\) nor a name"),
        ("judges:\n    oracle: {kind: hpsv2, path: x}", r"eval\.judges\.oracle: 'oracle' is a built-in judge"),
        ("judges:\n    Pick-1: {kind: pickscore, path: x}", r"eval\.judges\.Pick-1: a judge name is lower-case"),
        ("judges:\n    p: {kind: pickscore, path: x, clip_path: y}", r"clip_path is for kind 'aesthetic' only"),
        ("judges:\n    p: {kind: imagereward, path: x}", r"eval\.judges\.p\.kind"),
    ],
)
def test_judge_config_errors_name_the_key(tmp_path, eval_section, message):
    (tmp_path / "params.yaml").write_text(f"eval:\n  {eval_section}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "params.yaml")


def test_the_oracle_decides_on_the_demo_world_only():
    check_judge_choice(PipelineConfig())
    real = PipelineConfig(model={"preset": "sd15", "pretrained_path": "weights/sd15", "resolution": 64})
    with pytest.raises(ValueError, match=r"eval\.judge is 'oracle' but model\.preset is 'sd15'"):
        check_judge_choice(real)
    with pytest.raises(ValueError, match=r"eval\.judge is 'oracle'"):
        load_judges(real)  # before any folder is read
    check_judge_choice(real.model_copy(update={"eval": real.eval.model_copy(update={"judge": "reward"})}))
