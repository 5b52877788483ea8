"""Registry: content-hash dedupe, promotion rules, rollback, lineage, and the pyfunc in a fresh process."""

import base64
import io
import json
import os
import subprocess
import sys

import pytest

from prefalign import registry
from prefalign.config import PipelineConfig
from prefalign.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, pipeline_run, read_run_id, stage_run, tracking_uri


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, FLOW_RUN_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


def _cfg(root, policy_name: str, **registry_options) -> PipelineConfig:
    """One store for the module; a registered-model name per test keeps the tests independent."""
    return PipelineConfig.model_validate(
        {"paths": {"root": str(root)}, "registry": {"policy_name": policy_name, **registry_options}}
    )


@pytest.fixture(scope="module")
def client(root):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(_cfg(root, "x")))


def _weights(folder, payload: bytes, method: str = "dpo"):
    """A stand-in policy folder: the file layout of the real ones, arbitrary bytes (never loaded here)."""
    name = "pytorch_lora_weights.safetensors" if method == "dpo" else "unet/diffusion_pytorch_model.safetensors"
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    (folder / "history.json").write_text(json.dumps({"payload": payload.hex()}))
    return folder


@pytest.fixture(scope="module")
def base_dir(root):
    base = root / "base"
    _weights(base / "unet", b"base weights", "dpo")
    (base / "model_index.json").write_text("{}")
    return base


def _report(**scores) -> dict:
    """eval.json with ``method=(oracle_mean, ci_low vs base)``."""
    return {
        "judge": "oracle",
        "models": {m: {"oracle_mean": s, "reward_mean": 0.0} for m, (s, _) in scores.items()},
        "win_rates": {
            f"{m}_vs_base": {"oracle": {"rate": lo + 0.05, "ci_low": lo, "ci_high": lo + 0.1}}
            for m, (_, lo) in scores.items()
        },
    }


def _register(cfg, base_dir, folder, method, score):
    return registry.register_policy(
        cfg, method=method, policy_dir=folder, base_dir=base_dir, run_id=None, metrics={"oracle_mean": score}
    )


# ------------------------------------------------------------------------------------------ weights_sha
def test_weights_sha_hashes_weights_and_their_paths_only(tmp_path):
    a = _weights(tmp_path / "a", b"w1")
    first = registry.weights_sha(a)
    (a / "history.json").write_text("other logs")
    assert registry.weights_sha(a) == first
    assert registry.weights_sha(_weights(tmp_path / "b", b"w2")) != first
    assert registry.weights_sha(_weights(tmp_path / "c", b"w1", "dro")) != first  # same bytes, other path
    with pytest.raises(FileNotFoundError):
        registry.weights_sha(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- register
def test_same_weights_register_once(root, base_dir, client, tmp_path):
    cfg = _cfg(root, "p-dedupe")
    folder = _weights(tmp_path / "dpo", b"dpo weights")
    first = _register(cfg, base_dir, folder, "dpo", 0.6)
    again = _register(cfg, base_dir, folder, "dpo", 0.6)
    assert first.created and not again.created
    assert (again.version, again.weights_sha) == (first.version, first.weights_sha)
    assert len(client.search_model_versions("name = 'p-dedupe'")) == 1
    tags = client.get_model_version("p-dedupe", first.version).tags
    assert tags["method"] == "dpo" and tags["weights_sha"] == registry.weights_sha(folder)
    assert tags["metric.oracle_mean"] == "0.6" and tags["data_version"] == "unversioned"
    assert {"git_commit", "training_run_id"} <= set(tags)
    assert first.run_id  # no training run given: a registration run holds the model
    model = client.get_logged_model(client.get_model_version("p-dedupe", first.version).source.split("/")[-1])
    assert model.experiment_id == client.get_experiment_by_name("prefalign").experiment_id
    assert model.artifact_location.startswith((root / "mlruns" / "artifacts").resolve().as_uri())
    assert model.status == "READY"


def test_policy_is_logged_under_its_training_run(root, base_dir, client, tmp_path):
    cfg = _cfg(root, "p-run")
    with stage_run(cfg, "train_dro", out_dir=tmp_path / "dro"):
        pass
    run_id = read_run_id(tmp_path / "dro")
    info = registry.register_policy(
        cfg,
        method="dro",
        policy_dir=_weights(tmp_path / "dro", b"dro", "dro"),
        base_dir=base_dir,
        run_id=run_id,
        metrics={},
    )
    mv = client.get_model_version("p-run", info.version)
    assert info.run_id == mv.run_id == run_id == mv.tags["training_run_id"]
    assert mv.source.startswith("models:/m-")
    assert client.get_run(run_id).info.status == "FINISHED"  # logged by id, the run was not resumed


# ------------------------------------------------------------------------------------------------ promote
def test_promotion_rules(root, base_dir, client, tmp_path):
    cfg = _cfg(root, "p-promote")
    dpo = _register(cfg, base_dir, _weights(tmp_path / "dpo1", b"dpo1"), "dpo", 0.60)
    dro = _register(cfg, base_dir, _weights(tmp_path / "dro1", b"dro1", "dro"), "dro", 0.70)

    # DRO scores higher but does not beat the base (ci_low <= 0.5): DPO becomes the first champion.
    first = registry.promote(cfg, {"dpo": dpo, "dro": dro}, _report(dpo=(0.60, 0.55), dro=(0.70, 0.45)))
    assert first["promoted"] and first["champion"] == {"name": "p-promote", "version": dpo.version, "method": "dpo"}
    assert first["previous_champion"] is None and first["challenger"] is None
    assert [c["method"] for c in first["candidates"]] == ["dpo", "dro"]
    assert json.loads(json.dumps(first)) == first

    # A better qualifying DRO takes over; the replaced champion is kept in a tag and becomes challenger.
    dro2 = _register(cfg, base_dir, _weights(tmp_path / "dro2", b"dro2", "dro"), "dro", 0.80)
    second = registry.promote(cfg, {"dpo": dpo, "dro": dro2}, _report(dpo=(0.60, 0.55), dro=(0.80, 0.60)))
    assert second["promoted"] and second["champion"]["version"] == dro2.version
    assert second["previous_champion"]["version"] == dpo.version
    assert client.get_model_version("p-promote", dro2.version).tags["previous_champion"] == dpo.version
    assert str(client.get_model_version_by_alias("p-promote", "challenger").version) == dpo.version

    # A worse candidate, even one that beats the base, leaves the champion where it is.
    dpo3 = _register(cfg, base_dir, _weights(tmp_path / "dpo3", b"dpo3"), "dpo", 0.75)
    third = registry.promote(cfg, {"dpo": dpo3}, _report(dpo=(0.75, 0.70)))
    assert not third["promoted"] and "does not beat" in third["reason"]
    assert str(client.get_model_version_by_alias("p-promote", "champion").version) == dro2.version
    assert third["champion"]["version"] == dro2.version
    assert str(client.get_model_version_by_alias("p-promote", "challenger").version) == dpo3.version

    # The champion itself, re-registered by an unchanged pipeline, is not "promoted" again.
    again = _register(cfg, base_dir, tmp_path / "dro2", "dro", 0.80)
    assert not again.created
    fourth = registry.promote(cfg, {"dro": again}, _report(dro=(0.80, 0.60)))
    assert not fourth["promoted"] and "already champion" in fourth["reason"]

    # Roll back to the recorded previous champion; then there is none before it.
    back = registry.rollback(cfg)
    assert back["champion"]["version"] == dpo.version
    assert str(client.get_model_version_by_alias("p-promote", "champion").version) == dpo.version
    with pytest.raises(registry.RegistryError, match="first champion"):
        registry.rollback(cfg)

    # Every move is read back from the versions' tags, in order.
    history = registry.history(cfg)
    assert history["champion"] == dpo.version and history["consistent"]
    assert [(m["action"], m["version"], m["previous"]) for m in history["moves"]] == [
        ("promote", dpo.version, None),
        ("promote", dro2.version, dpo.version),
        ("rollback", dpo.version, dro2.version),
    ]
    assert second["move"] == history["moves"][1] and history["moves"][1]["previous_score"] == 0.6
    assert len(registry.history_lines(history)) == 4


def test_nothing_qualifies_nothing_moves(root, base_dir, client, tmp_path):
    cfg = _cfg(root, "p-none")
    dpo = _register(cfg, base_dir, _weights(tmp_path / "dpo", b"weak"), "dpo", 0.4)
    decision = registry.promote(cfg, {"dpo": dpo}, _report(dpo=(0.4, 0.3)))
    assert not decision["promoted"] and decision["champion"] is None
    assert "beats base" in decision["reason"]
    relaxed = registry.promote(_cfg(root, "p-none", require_beats_base=False), {"dpo": dpo}, _report(dpo=(0.4, 0.3)))
    assert relaxed["promoted"]


# ------------------------------------------------------------------------------------- reward + lineage
def test_reward_roundtrip_and_lineage(root, base_dir, client, tmp_path):
    cfg = _cfg(root, "p-lineage")
    out = {name: tmp_path / name for name in ("world", "prefs", "validation", "features", "reward", "dro")}
    with pipeline_run(cfg, flow_run_id="flow-9") as parent:
        for stage, folder, upstream in [
            ("world", "world", []),
            ("ingest", "prefs", ["world"]),
            ("validate", "validation", ["prefs"]),
            ("featurize", "features", ["prefs"]),
            ("train_reward", "reward", ["prefs"]),
            ("train_dro", "dro", ["features", "reward"]),
        ]:
            with stage_run(cfg, stage, out_dir=out[folder], upstream=[out[u] for u in upstream]) as tracker:
                if stage == "validate":
                    (tmp_path / "validation.json").write_text('{"success": true}')
                    tracker.log_artifact(tmp_path / "validation.json")
    reward = registry.register_reward(
        cfg,
        model_dir=_weights(out["reward"], b"clip", "dpo"),
        run_id=read_run_id(out["reward"]),
        metrics={"pairwise_accuracy": 0.8},
    )
    assert registry.register_reward(cfg, model_dir=out["reward"], run_id=None, metrics={}).created is False
    assert registry.reward_tags(cfg, out["reward"]) == {
        "prefalign.reward_weights_sha": reward.weights_sha,
        "prefalign.reward_version": f"prefalign-reward/{reward.version}",
    }
    unregistered = _weights(tmp_path / "other_reward", b"other clip", "dpo")
    assert "prefalign.reward_version" not in registry.reward_tags(cfg, unregistered)
    fetched = registry.fetch_model_folder(f"prefalign-reward/{reward.version}", cfg, tmp_path / "fetched")
    assert (fetched / "pytorch_lora_weights.safetensors").read_bytes() == b"clip"

    dro = registry.register_policy(
        cfg,
        method="dro",
        policy_dir=_weights(out["dro"], b"dro-l", "dro"),
        base_dir=base_dir,
        run_id=read_run_id(out["dro"]),
        metrics={"oracle_mean": 0.7},
    )
    registry.promote(cfg, {"dro": dro}, _report(dro=(0.7, 0.6)))
    lines = registry.lineage("models:/p-lineage@champion", cfg)
    text = "\n".join(lines)
    assert lines[0].startswith(f"model p-lineage v{dro.version}") and "champion" in lines[0]
    assert f"training run {read_run_id(out['dro'])} [train_dro]" in text
    upstream = [("featurize", "features"), ("ingest", "prefs"), ("world", "world"), ("train_reward", "reward")]
    for stage, folder in upstream:
        assert f"upstream run {read_run_id(out[folder])} [{stage}]" in text
    assert text.count(f"upstream run {read_run_id(out['prefs'])}") == 1  # reached twice, listed once
    assert f"reward model prefalign-reward v{reward.version}" in text
    assert "data version unversioned" in text
    assert f"validation.json (run {read_run_id(out['validation'])})" in text
    assert client.get_run(parent).info.status == "FINISHED"
    assert lines == registry.lineage(f"p-lineage/{dro.version}", cfg)
    record = registry.lineage_record(f"p-lineage/{dro.version}", cfg)
    assert json.loads(json.dumps(record)) == record and registry.lineage_lines(record) == lines
    assert [(r["role"], r["stage"]) for r in record["runs"]][:2] == [
        ("training", "train_dro"),
        ("upstream", "featurize"),
    ]
    assert {r["run_id"] for r in record["runs"]} == {read_run_id(out[f]) for f in ("dro", *dict(upstream).values())}
    assert record["reward_model"] == {
        "name": "prefalign-reward",
        "version": reward.version,
        "run_id": read_run_id(out["reward"]),
        "registered": True,
        "via": "upstream_run",
    }
    assert record["validation_report"]["run_id"] == read_run_id(out["validation"])
    for bad in ("p-lineage", "p-lineage@nope", "p-lineage/99", "nobody/1"):
        with pytest.raises(registry.RegistryError, match="model reference"):
            registry.lineage(bad, cfg)


# --------------------------------------------------------------------------- pyfunc in a fresh process
def _tiny_pipeline(folder):
    """A randomly initialised tiny Stable Diffusion (the demo architecture) and a DRO-style policy."""
    import torch

    from prefalign.config import ModelConfig
    from prefalign.models import diffusion
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    torch.manual_seed(0)
    model = ModelConfig(unet_channels=(32, 64), vae_channels=(32, 32), text_hidden=32)
    tokenizer = build_tokenizer(vocabulary_words())
    vae, unet = diffusion.build_tiny_vae(model), diffusion.build_tiny_unet(model, 8)
    pipe = diffusion.assemble_pipeline(vae, diffusion.build_tiny_text_encoder(model, tokenizer), tokenizer, unet)
    pipe.save_pretrained(str(folder / "base"), safe_serialization=True)
    torch.nn.init.normal_(pipe.unet.conv_out.weight, std=0.02)  # a policy that differs from the base
    pipe.unet.save_pretrained(str(folder / "dro" / "unet"), safe_serialization=True)
    return folder / "base", folder / "dro"


LOAD_AND_PREDICT = """
import json, mlflow
model = mlflow.pyfunc.load_model("models:/prefalign-policy@champion")
prompts = ["a small red circle at the center on a black background", "a big blue square at the top left"]
first = model.predict(prompts, params={"num_inference_steps": 2, "seed": 7})
again = model.predict(prompts[:1], params={"num_inference_steps": 2, "seed": 7})
other = model.predict(prompts[:1], params={"num_inference_steps": 2, "seed": 8})
print(json.dumps({"first": first, "again": again, "other": other}))
"""


def test_champion_pyfunc_loads_and_predicts_in_a_fresh_process(tmp_path):
    pytest.importorskip("prefalign.models.diffusion", reason="needs the lead's load_policy_pipeline")
    from PIL import Image

    from prefalign.models.diffusion import load_policy_pipeline  # noqa: F401  (the pyfunc's loader)

    cfg = PipelineConfig.model_validate({"paths": {"root": str(tmp_path)}})
    base, policy = _tiny_pipeline(tmp_path)
    info = registry.register_policy(cfg, method="dro", policy_dir=policy, base_dir=base, run_id=None, metrics={})
    assert registry.promote(cfg, {"dro": info}, _report(dro=(0.7, 0.6)))["promoted"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg)}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["first"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(out["first"][0])))
    assert image.format == "PNG" and image.size == (16, 16)
    assert out["again"][0] == out["first"][0]  # prompt i uses seed + i, whatever the batch
    assert out["other"][0] != out["first"][0]
