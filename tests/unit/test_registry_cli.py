"""`prefalign promote`, `promote --rollback`, `registry history` and `lineage` against a real MLflow registry.

Bad inputs must end in one line naming the thing, exit code 2, no traceback, and the registry as it was:
each such test snapshots every registered model, version, tag and alias of the store before and after.
The policies are real files (a tiny random-weight pipeline, a LoRA saved by ``save_lora``, a full UNet),
so the header checks run on what the trainers write.
"""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from prefalign import registry
from prefalign.cli import app
from prefalign.config import PipelineConfig
from prefalign.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, FLOW_RUN_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base pipeline, a DPO LoRA of its UNet, and two different full-UNet DRO results."""
    import torch

    from prefalign.config import LoraConfig, ModelConfig
    from prefalign.models import diffusion
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = ModelConfig(unet_channels=(32, 64), vae_channels=(32, 32), text_hidden=32)
    tokenizer = build_tokenizer(vocabulary_words())
    vae, unet = diffusion.build_tiny_vae(model), diffusion.build_tiny_unet(model, 8)
    pipe = diffusion.assemble_pipeline(vae, diffusion.build_tiny_text_encoder(model, tokenizer), tokenizer, unet)
    pipe.save_pretrained(str(folder / "base"), safe_serialization=True)
    for name, std in (("dro_a", 0.02), ("dro_b", 0.05)):
        torch.nn.init.normal_(pipe.unet.conv_out.weight, std=std)
        pipe.unet.save_pretrained(str(folder / name / "unet"), safe_serialization=True)
    diffusion.add_lora(pipe.unet, LoraConfig(rank=2, alpha=2.0))
    diffusion.save_lora(pipe.unet, folder / "dpo")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module; each test uses its own registered-model name."""
    return tmp_path_factory.mktemp("store")


def _eval_report(dpo=(0.60, 0.55), dro=(0.70, 0.60)) -> dict:
    """eval.json as the evaluate stage writes it, for ``method=(oracle_mean, ci_low vs base)``."""
    scores = {"dpo": dpo, "dro": dro}
    return {
        "judge": "oracle",
        "models": {m: {"oracle_mean": s, "reward_mean": 0.1} for m, (s, _) in scores.items()},
        "win_rates": {
            f"{m}_vs_base": {"oracle": {"rate": lo + 0.05, "ci_low": lo, "ci_high": lo + 0.1}}
            for m, (_, lo) in scores.items()
        },
    }


def _params(tmp_path, store, models, name, report=None, **paths):
    """A params.yaml (and eval.json) under ``tmp_path``, its root, on the shared store and the module's models."""
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "eval.json").write_text(json.dumps(report or _eval_report()))
    folders = {"base_model": models / "base", "dpo": models / "dpo", "dro": models / "dro_a", "reports": reports}
    tree = {
        "paths": {key: str(value) for key, value in {**folders, **paths}.items()},
        "registry": {"policy_name": name},
        "tracking": {"uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_root": str(store / "artifacts")},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _client(store):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def _snapshot(store) -> dict:
    """Every registered model (aliases, tags) and every version (tags, status) in the store."""
    client = _client(store)
    return {
        "models": sorted(
            (m.name, sorted(m.aliases.items()), sorted(m.tags.items())) for m in client.search_registered_models()
        ),
        "versions": sorted(
            (v.name, int(v.version), sorted(v.tags.items()), v.status) for v in client.search_model_versions()
        ),
    }


def _refused(result, *named):
    """One line on stderr naming each of ``named``, exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for thing in named:
        assert thing in lines[0]


def _champion(store, name) -> str:
    return str(_client(store).get_model_version_by_alias(name, "champion").version)


# ------------------------------------------------------------------------------------- promote validation
def _no_dro(tmp_path, models):
    return {"dro": tmp_path / "missing_dro"}, "missing_dro"


def _empty_dpo(tmp_path, models):
    (tmp_path / "dpo_empty").mkdir()
    return {"dpo": tmp_path / "dpo_empty"}, "neither a unet/ folder nor pytorch_lora_weights.safetensors"


def _corrupt_lora(tmp_path, models):
    folder = tmp_path / "dpo_corrupt"
    folder.mkdir()
    data = (models / "dpo" / "pytorch_lora_weights.safetensors").read_bytes()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])  # a truncated copy
    return {"dpo": folder}, "pytorch_lora_weights.safetensors: not a readable safetensors file"


def _lora_of_another_unet(tmp_path, models):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dpo_other"
    folder.mkdir()
    state = load_file(models / "dpo" / "pytorch_lora_weights.safetensors")
    key = next(k for k in state if k.endswith("to_q.lora_A.weight"))
    state[key.replace("to_q", "to_z")] = state.pop(key)
    save_file(state, folder / "pytorch_lora_weights.safetensors")
    return {"dpo": folder}, "which the base UNet does not have"


def _lora_of_wrong_width(tmp_path, models):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dpo_wide"
    folder.mkdir()
    state = load_file(models / "dpo" / "pytorch_lora_weights.safetensors")
    key = next(k for k in state if k.endswith("to_q.lora_B.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, folder / "pytorch_lora_weights.safetensors")
    return {"dpo": folder}, "does not fit"


def _unet_of_another_model(tmp_path, models):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dro_other"
    shutil.copytree(models / "dro_a", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("conv_out.weight")
    save_file(state, weights)
    return {"dro": folder}, "tensor(s) of the base UNet missing, e.g. conv_out.weight"


def _no_base(tmp_path, models):
    return {"base_model": tmp_path / "no_base"}, "no_base"


def _no_report(tmp_path, models):
    (tmp_path / "reports" / "eval.json").unlink()
    return {}, "eval.json: evaluation report not found"


def _report_not_json(tmp_path, models):
    (tmp_path / "reports" / "eval.json").write_text("{not json")
    return {}, "eval.json: not a readable JSON file"


def _report_without_dro_win_rate(tmp_path, models):
    report = _eval_report()
    del report["win_rates"]["dro_vs_base"]
    (tmp_path / "reports" / "eval.json").write_text(json.dumps(report))
    return {}, "key win_rates.dro_vs_base is missing"


def _report_score_not_a_number(tmp_path, models):
    report = _eval_report()
    report["models"]["dro"]["oracle_mean"] = "high"
    (tmp_path / "reports" / "eval.json").write_text(json.dumps(report))
    return {}, "key models.dro.oracle_mean is 'high', not a finite number"


BAD_INPUTS = [
    _no_dro,
    _empty_dpo,
    _corrupt_lora,
    _lora_of_another_unet,
    _lora_of_wrong_width,
    _unet_of_another_model,
    _no_base,
    _no_report,
    _report_not_json,
    _report_without_dro_win_rate,
    _report_score_not_a_number,
]


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_promote_refuses_bad_input_before_any_write(bad_input, tmp_path, store, models):
    name = f"cli-bad-{bad_input.__name__.strip('_')}"
    # A champion exists, and the DPO candidate below is new: the old command registered it, then failed.
    assert _cli("promote", "--params", _params(tmp_path, store, models, name, dpo=models / "dro_b")).exit_code == 0
    params = _params(tmp_path, store, models, name)
    broken, message = bad_input(tmp_path, models)
    if broken:
        params = _params(tmp_path, store, models, name, **broken)
    before = _snapshot(store)
    _refused(_cli("promote", "--params", params), message)
    assert _snapshot(store) == before
    assert _champion(store, name) == "2"  # dro_a, from the first promotion


# ----------------------------------------------------------------------------------- rollback and history
def _history(params) -> dict:
    result = _cli("registry", "history", "--params", params, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_promote_rollback_and_history(tmp_path, store, models, monkeypatch):
    name = "cli-history"
    params = _params(tmp_path, store, models, name)
    before = _snapshot(store)
    _refused(_cli("promote", "--rollback", "--params", params), f"{name}@champion: no champion")
    assert _snapshot(store) == before
    _refused(_cli("registry", "history", "--params", params), f"no registered model '{name}'")

    monkeypatch.setenv(FLOW_RUN_ENV, "flow-1")
    first = _cli("promote", "--params", params)
    assert first.exit_code == 0, first.output
    dro_a = json.loads(first.stdout)["champion"]["version"]
    monkeypatch.delenv(FLOW_RUN_ENV)
    params = _params(tmp_path, store, models, name, report=_eval_report(dro=(0.8, 0.7)), dro=models / "dro_b")
    second = json.loads(_cli("promote", "--params", params).stdout)
    dro_b = second["champion"]["version"]
    assert second["promoted"] and second["previous_champion"]["version"] == dro_a != dro_b

    moves = _history(params)["moves"]
    assert [(m["seq"], m["action"], m["version"], m["previous"]) for m in moves] == [
        (1, "promote", dro_a, None),
        (2, "promote", dro_b, dro_a),
    ]
    assert (moves[0]["score"], moves[0]["previous_score"], moves[0]["flow_run"]) == (0.7, None, "flow-1")
    assert (moves[1]["score"], moves[1]["previous_score"], moves[1]["flow_run"]) == (0.8, 0.7, None)
    assert moves[1]["metric"] == "oracle" and moves[1]["method"] == "dro" and moves[0]["at"] < moves[1]["at"]
    version_tags = _client(store).get_model_version(name, dro_b).tags
    assert version_tags["previous_champion"] == dro_a and "promoted_at" in version_tags  # the tags kept

    back = _cli("promote", "--rollback", "--params", params)
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout)["champion"]["version"] == dro_a == _champion(store, name)
    record = _history(params)
    assert record["champion"] == dro_a and record["consistent"]
    assert (record["moves"][-1]["action"], record["moves"][-1]["previous"]) == ("rollback", dro_b)
    text = _cli("registry", "history", "--params", params).stdout.splitlines()
    assert text[0] == f"{name}@champion: v{dro_a}" and len(text) == 4
    assert f"#2 {moves[1]['at']} promote v{dro_b} (dro) replacing v{dro_a} oracle_mean 0.8000 vs 0.7000" in text[2]
    assert "rollback" in text[3]

    # dro_a was the first champion: nothing further back, and nothing is written.
    before = _snapshot(store)
    _refused(_cli("promote", "--rollback", "--params", params), f"v{dro_a} was the first champion")
    assert _snapshot(store) == before

    # An alias moved by hand shows up as an inconsistency, not as a move.
    _client(store).set_registered_model_alias(name, "champion", dro_b)
    record = _history(params)
    assert not record["consistent"] and len(record["moves"]) == 3
    assert "note:" in _cli("registry", "history", "--params", params).stdout


# ------------------------------------------------------------------------------------------------ lineage
def test_lineage_json_has_the_text_facts_and_bad_refs_are_refused(tmp_path, store, models):
    name = "cli-lineage"
    params = _params(tmp_path, store, models, name)
    assert _cli("promote", "--params", params).exit_code == 0
    as_json = _cli("lineage", f"{name}@champion", "--params", params, "--json")
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.stdout)
    mv = _client(store).get_model_version_by_alias(name, "champion")
    assert record["model"]["version"] == str(mv.version) and record["model"]["method"] == "dro"
    assert record["model"]["aliases"] == ["champion"] and record["model"]["weights_sha"] == mv.tags["weights_sha"]
    assert record["training_run"] == mv.run_id  # no run.json: the registration run holds the model
    assert record["runs"][0] | {"status": None} == {
        "run_id": mv.run_id,
        "role": "training",
        "depth": 0,
        "found": True,
        "stage": "register_dro",
        "status": None,
        "git_commit": None,
        "params_sha": None,
        "data_version": None,
    }
    assert record["data"]["version"] == "unversioned" and record["reward_model"] is None
    text = _cli("lineage", f"{name}/{mv.version}", "--params", params)
    assert text.exit_code == 0 and text.stdout.splitlines() == registry.lineage_lines(record)
    cfg = PipelineConfig.model_validate(yaml.safe_load(params.read_text()))
    assert registry.lineage_record(f"{name}@champion", cfg) == record

    before = _snapshot(store)
    for ref, named in [
        (f"{name}@nope", f"{name} has no alias 'nope' (its aliases: challenger, champion)"),
        (f"{name}/99", f"{name} has no version 99"),
        ("no-such-model@champion", "no registered model 'no-such-model'"),
        (name, "is neither NAME@ALIAS nor NAME/VERSION"),
        (f"{name}@", "is neither"),
        (f"{name}/v1", "is neither"),
        ("@champion", "is neither"),
    ]:
        for extra in ([], ["--json"]):
            _refused(_cli("lineage", ref, "--params", params, *extra), repr(ref), named)
    assert _snapshot(store) == before
