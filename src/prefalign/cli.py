"""The ``prefalign`` command: stages (what ``dvc repro`` runs), the whole pipeline, registry and data tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from prefalign.runtime import apply_offline_defaults, configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Preference data: import and validate.")
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params.yaml to use.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-S", help="Dotted override, e.g. dpo.beta=5000.")]


def _config(params: Path, overrides: list[str] | None):
    from prefalign.config import ConfigError, load_config, parse_override

    try:
        return load_config(params, dict(parse_override(o) for o in overrides or []))
    except ConfigError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def stage(name: str, params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Run one pipeline stage (the same names as dvc.yaml and the flow)."""
    from prefalign.stages import STAGES, DataValidationError, run_stage

    if name not in STAGES:
        typer.secho(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", fg="red", err=True)
        raise typer.Exit(2)
    cfg = _config(params, overrides)
    try:
        summary = run_stage(name, cfg)
    except DataValidationError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def init(
    profile: Annotated[str, typer.Option("--profile", help="demo (the demo world) or sd15 (SD1.5, Pick-a-Pic).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the params file.")] = Path("params.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a full, commented params.yaml for a profile (each value it sets names its source)."""
    from prefalign.profiles import ProfileError, get_profile, write_profile

    try:
        path = write_profile(profile, out, force=force)
    except ProfileError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path} (profile {profile})")
    for key, what in get_profile(profile).placeholders.items():
        typer.echo(f"  set {key}: {what}")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    mode: Annotated[str, typer.Option(help="dvc: each stage through `dvc repro`; direct: in-process.")] = "dvc",
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect API unless PREFECT_API_URL is set)."""
    root = params.resolve().parent
    if not (root / "flows" / "pipeline.py").is_file():
        typer.secho(f"{root}: no flows/pipeline.py here; run from the prefalign repo root", fg="red", err=True)
        raise typer.Exit(2)
    cmd = [sys.executable, "-m", "flows.pipeline", "--params", str(params.resolve()), "--mode", mode]
    raise typer.Exit(subprocess.call(cmd, cwd=root))


@app.command()
def promote(
    params: ParamsOpt = Path("params.yaml"),
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Restore the previous champion instead of promoting.")
    ] = False,
) -> None:
    """Register the trained DPO and DRO policies and move `champion` to the best qualifying one.

    Every input (both policy folders, the base model, reports/eval.json) is checked before the first registry
    write: a bad one exits 2 with the registry unchanged.
    """
    from prefalign import registry

    cfg = _config(params, None)
    try:
        result = registry.rollback(cfg) if rollback else registry.register_and_promote(cfg)
    except registry.RegistryError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=2, default=str))


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object instead of text lines.")]


@app.command()
def lineage(ref: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False) -> None:
    """Print the chain from a registered model (e.g. prefalign-policy@champion) back to its data."""
    from prefalign import registry

    cfg = _config(params, None)
    try:
        record = registry.lineage_record(ref, cfg)
    except registry.RegistryError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(record, indent=2) if as_json else "\n".join(registry.lineage_lines(record)))


registry_app = typer.Typer(no_args_is_help=True, help="The model registry: the champion's history.")
app.add_typer(registry_app, name="registry")


@registry_app.command("history")
def registry_history(params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False) -> None:
    """Print every move of the champion alias (promotions, rollbacks), oldest first, as recorded on versions."""
    from prefalign import registry

    cfg = _config(params, None)
    try:
        record = registry.history(cfg)
    except registry.RegistryError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(record, indent=2) if as_json else "\n".join(registry.history_lines(record)))


@data_app.command("validate")
def data_validate(
    input: Annotated[Path, typer.Option("--input", help="Canonical preference folder.")],
    report: Annotated[Path, typer.Option("--report", help="Where to write the JSON report.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Validate a preference folder: exit 0 valid, 1 invalid (listing what failed), 2 unreadable."""
    from prefalign.data.validation import DataUnreadableError, validate_preferences

    cfg = _config(params, None)
    try:
        result = validate_preferences(
            input, cfg.validation, report_path=report, docs_dir=report.parent / "data_docs", data=cfg.data
        )
    except DataUnreadableError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    for line in result.failures():
        typer.secho(line, fg="red", err=True)
    typer.echo(f"{'valid' if result.success else 'INVALID'}: report at {report}")
    raise typer.Exit(0 if result.success else 1)


ImportFormat = Literal["pickapic", "hpd", "jsonl"]


@data_app.command("import")
def data_import(
    format: Annotated[ImportFormat, typer.Option("--format", help="Input format (docs/data_formats.md).")],
    input: Annotated[Path, typer.Option("--input", help="Pick-a-Pic shard or folder of shards, HPD JSON, JSONL.")],
    output: Annotated[Path, typer.Option("--output", help="Canonical preference folder (appended to).")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import real preference data: exit 0 imported (or already present), 1 nothing importable, 2 unreadable."""
    from prefalign.data.importers import ImportAbortedError, import_preferences

    cfg = _config(params, None)
    try:
        summary = import_preferences(format, input, output, data=cfg.data, validation=cfg.validation)
    except ImportAbortedError as err:
        typer.secho(f"import failed: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.line())
    typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
    if summary.exit_code:
        typer.secho(
            f"nothing imported from {input}: every row was skipped or quarantined "
            f"(see {output / 'quarantine.parquet'})",
            fg="red",
            err=True,
        )
    raise typer.Exit(summary.exit_code)


judge_app = typer.Typer(no_args_is_help=True, help="Independent judges: published checkpoints to local folders.")
app.add_typer(judge_app, name="judge")


@judge_app.command("convert-hps")
def judge_convert_hps(
    checkpoint: Annotated[Path, typer.Argument(help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt.")],
    out_dir: Annotated[Path, typer.Argument(help="The judge folder to write (CLIPModel, safetensors).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="A CLIP-H tokenizer folder (copied).")],
    config: Annotated[
        Path | None, typer.Option("--config", help="JSON merged into ViT-H-14's CLIPConfig sections.")
    ] = None,
) -> None:
    """HPS v2 open_clip ViT-H-14 state dict -> a CLIPModel folder for eval.judges (kind hpsv2)."""
    from prefalign.evaluation.judge_convert import convert_hps

    try:
        overrides = json.loads(config.read_text()) if config else None
        convert_hps(checkpoint, out_dir, tokenizer_dir=tokenizer, config_overrides=overrides)
    except (ValueError, OSError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out_dir}")


@judge_app.command("convert-aesthetic")
def judge_convert_aesthetic(
    source: Annotated[Path, typer.Argument(help="sac+logos+ava1-l14-linearMSE.pth (or a .safetensors of it).")],
    out_dir: Annotated[Path, typer.Argument(help="The judge folder; add its CLIP ViT-L/14 folder as clip/.")],
) -> None:
    """LAION aesthetic predictor v2 MLP -> aesthetic_mlp.safetensors for eval.judges (kind aesthetic)."""
    from prefalign.evaluation.judge_convert import convert_aesthetic

    try:
        written = convert_aesthetic(source, out_dir)
    except (ValueError, OSError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {written}; the judge also needs {out_dir / 'clip'} (a CLIP ViT-L/14 folder) or a clip_path")


def main() -> None:
    apply_offline_defaults()
    configure_logging()
    app()


if __name__ == "__main__":
    main()
