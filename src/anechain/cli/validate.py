"""`anechain validate shard`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from anechain.cli._common import (
    AsciiIntRange,
    FiniteFloat,
    InputFile,
    backend_option,
    cache_dir_option,
    check_outputs,
    config_option,
    model_option,
    progress_printer,
    render_table,
    report_only_option,
    resolve_config,
    with_options,
)
from anechain.runners import resolve_backend
from anechain.runners.coreml import COMPUTE_UNITS


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{value:.6f}" if abs(value) < 1 else f"{value:.4f}"


def render_report(report: dict) -> str:
    rows = [
        [
            g["name"],
            _fmt(g["value"]),
            f"{g['op']} {_fmt(g['bound'])}",
            "pass" if g["passed"] else "FAIL",
        ]
        for g in report["gates"]
    ]
    res = report["residency"]
    if res["status"] == "not_checked":
        rows.append(["residency", "-", "strict", "not checked"])
    else:
        c = res.get("counts") or {}
        value = (
            f"conv {c.get('conv_ane', '?')}/{c.get('conv_total', '?')} on ANE, "
            f"{c.get('compute_non_ane', '?')} non-ANE"
        )
        unreported = res.get("unreported_functions") or []
        if unreported:  # their ops are not in the counts
            value += f"; {', '.join(unreported)}: usage not reported by Core ML"
        verdict = {True: "pass", False: "FAIL", None: "report only"}[res.get("passed")]
        rows.append(["residency", value, res["status"], verdict])
    lines = [
        f"{report['package']['path']}  layers {report['layers'] or 'head'}  "
        f"backend {report['backend']}  "
        f"{report['steps']} steps",
        render_table(["gate", "value", "bound", "result"], rows),
    ]
    golden = report["golden"]
    if golden["first_nonfinite"]:
        f = golden["first_nonfinite"]
        where = f" in layer {f['layer']}" if f.get("layer") is not None else ""
        op = f" at op {f['op']} ({f.get('op_type')})" if f.get("op") else ""
        lines.append(f"first non-finite value: step {f['step']}{where}{op}")
    if golden["layer_max_abs"]:
        peaks = ", ".join(f"{k}: {_fmt(v)}" for k, v in golden["layer_max_abs"].items())
        lines.append(f"largest |activation| per layer: {peaks}")
    if golden.get("layers"):
        deltas = ", ".join(f"{m['layer']}: {_fmt(m['delta_cosine'])}" for m in golden["layers"])
        lines.append(f"delta cosine per layer: {deltas}")
    for name, window in (golden.get("windows") or {}).items():
        lines.append(
            f"{name} window: cosine {_fmt(window['cosine'])}, delta cosine "
            f"{_fmt(window['delta_cosine'])}"
        )
    prefill = report.get("prefill")
    if prefill:  # the prefill_* gates above: chunks at offset+rows, then decode from them
        chunks = ", ".join(f"{o}+{n}" for o, n in prefill["chunks"])
        lines.append(f"prefill T={prefill['tokens']}: chunks {chunks}, then decode from that cache")
    long = report.get("long")
    if long:  # the long_* gates above: the runtime's run
        how = (
            f"prefill T={long['tokens']} ({len(long['chunks'])} chunks)"
            if long["function"] == "prefill"
            else "decode, token by token"
        )
        lines.append(
            f"long window: {long['prompt']} prompt positions through {how}, then "
            f"{long['decode_steps']} decode steps from that cache"
        )
    status = report["residency"]["status"]
    caveat = {
        "not_checked": " (residency not checked)",
        "report_only": " (residency reported, not gated)",
    }.get(status, "")
    lines.append(f"verdict: {report['verdict'].upper()}{caveat}")
    return "\n".join(lines)


@click.group("validate")
def validate() -> None:
    """Prove artifacts against PyTorch before they ship."""


@validate.command("shard")
@click.argument("package", type=click.Path(path_type=Path, exists=True))
@model_option("The checkpoint the shard was exported from.")
@backend_option
@config_option(
    "anechain YAML config for steps, calibration and gates (default: the phi-4-mini preset)."
)
@click.option("--steps", type=AsciiIntRange(min=1), help="Decode steps to compare.")
@click.option(
    "--long-tokens",
    type=AsciiIntRange(min=0),
    help="Prompt positions of the long window (the runtime's run: prefill through the "
    "shard's own cache, then decode); 0: no long window. Default: validation.long_tokens, "
    "else the context minus validation.long_steps.",
)
@click.option(
    "--compute-units",
    type=click.Choice(COMPUTE_UNITS),
    default="cpu_and_ne",
    show_default=True,
    help="coreml backend only. cpu_only computes in fp32 and hides fp16 overflow: use it as "
    "an extra comparison, never as the gate.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON report path (default: beside the package, NAME.report.json).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the report as one self-contained HTML page (figures inline).",
)
@click.option("--min-cosine", type=FiniteFloat(), help="Gate override.")
@click.option("--min-delta-cosine", type=FiniteFloat(), help="Gate override.")
@click.option(
    "--max-rel-rmse", type=FiniteFloat(), help="Gate override: worst step's RMSE / RMS(reference)."
)
@click.option(
    "--max-rel-abs",
    type=FiniteFloat(),
    help="Gate override: worst |error_i| / (RMS(reference) + |reference_i|).",
)
@click.option(
    "--compute-plan",
    "plan_file",
    type=InputFile(),
    help="Replay a saved compute plan for residency (any OS).",
)
@click.option(
    "--save-plan",
    "save_plan_to",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Save the live compute plan as JSON (macOS).",
)
@report_only_option
@cache_dir_option
def validate_shard_cmd(
    package: Path,
    model_dir: Path,
    backend: str,
    config_path: Path | None,
    steps: int | None,
    long_tokens: int | None,
    compute_units: str,
    report_path: Path | None,
    html_path: Path | None,
    min_cosine: float | None,
    min_delta_cosine: float | None,
    max_rel_rmse: float | None,
    max_rel_abs: float | None,
    plan_file: Path | None,
    save_plan_to: Path | None,
    report_only: bool,
    cache_dir: Path | None,
) -> None:
    """Compare a shard with transformers' Phi3 layers, step by step; reject NaN/Inf.

    The layer range and I/O contract come from the package's metadata; a package from
    another checkpoint is refused. Prints one table (each gate: value, bound, result) and
    writes a JSON report. Exit 0 when every gate passes, 1 when one fails.

    \b
    Examples:
      anechain validate shard artifacts/tiny/layers_0_3.mlpackage \\
          --model artifacts/tiny/checkpoint --config configs/tiny.yaml --backend mil
      anechain validate shard layers_24_30.mlpackage --model ~/models/Phi-4-mini-instruct \\
          --min-cosine 0.999
    """
    from anechain.checkpoint import Checkpoint
    from anechain.report import report_path_for
    from anechain.validate import ResidencyOptions, validate_shard

    config = resolve_config(config_path)
    gates = with_options(
        config.validation.gates,
        min_cosine=("--min-cosine", min_cosine),
        min_delta_cosine=("--min-delta-cosine", min_delta_cosine),
        max_rel_rmse=("--max-rel-rmse", max_rel_rmse),
        max_rel_abs=("--max-rel-abs", max_rel_abs),
    )
    settings = with_options(
        dataclasses.replace(config.validation, gates=gates),
        steps=("--steps", steps),
        long_tokens=("--long-tokens", long_tokens),
    )

    from anechain.residency import live_plan_available

    if save_plan_to is not None and plan_file is None and not live_plan_available():
        raise click.BadParameter(
            "this machine cannot read a live compute plan (macOS 14.4+), so there is none "
            "to save; replay a saved one with --compute-plan",
            param_hint="--save-plan",
        )
    check_outputs(report_path or report_path_for(package), save_plan_to, html_path)
    checkpoint = Checkpoint(model_dir)
    residency = ResidencyOptions(config.residency, plan_file, save_plan_to, report_only)
    if compute_units != "cpu_and_ne" and resolve_backend(backend) != "coreml":
        raise click.BadParameter(
            "only the coreml backend has compute units", param_hint="--compute-units"
        )
    runner_options = (
        {"compute_units": compute_units} if resolve_backend(backend) == "coreml" else {}
    )
    report = validate_shard(
        package,
        checkpoint,
        settings,
        backend=backend,
        residency=residency,
        cache_dir=cache_dir,
        progress=progress_printer(),
        runner_options=runner_options,
    )
    out = report_path or report_path_for(package)
    data = report.write(out)
    click.echo(render_report(data))
    click.echo(f"report: {out}", err=True)
    if html_path is not None:
        from anechain.html_pages import shard_page
        from anechain.html_report import write_page

        write_page(html_path, shard_page(data))
        click.echo(f"report page: {html_path}", err=True)
    if report.verdict != "pass":
        raise click.exceptions.Exit(1)


COMMANDS = [validate]
