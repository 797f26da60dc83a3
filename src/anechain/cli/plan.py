"""`anechain plan`."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli._common import (
    AsciiIntRange,
    FiniteFloat,
    backend_option,
    cache_dir_option,
    check_outputs,
    config_option,
    human_bytes,
    model_option,
    progress_printer,
    render_table,
    report_only_option,
    resolve_config,
)
from anechain.config import Architecture
from anechain.search import DEFAULT_SIZE_BUDGET_BYTES, estimate_shard_bytes


def render_attempts(
    attempts: tuple, arch: Architecture | None = None, quantization: str = "int8"
) -> str:
    """Every range the search validated, in order, with its estimated and real size and what
    it decided."""
    rows = []
    for n, a in enumerate(attempts, start=1):
        r = a.result
        result = "pass" if r.passed else "FAIL " + ", ".join(r.failed_gates)
        if r.failing_layer is not None:
            result += f" (NaN/Inf in layer {r.failing_layer})"
        rows.append(
            [
                str(n),
                str(a.layers),
                human_bytes(estimate_shard_bytes(arch, a.layers.num_layers, quantization))
                if arch is not None
                else "-",
                human_bytes(r.size_bytes) if r.size_bytes is not None else "-",
                a.phase,
                "cached" if r.reused else "new",
                r.residency or "-",
                result,
                a.decision,
            ]
        )
    headers = [
        "#",
        "layers",
        "est. size",
        "size",
        "phase",
        "work",
        "residency",
        "result",
        "decision",
    ]
    return render_table(headers, rows)


@click.command("plan")
@model_option()
@config_option(
    "anechain YAML config: export, validation and residency settings "
    "(default: the phi-4-mini preset)."
)
@click.option(
    "--max-layers-per-shard",
    type=AsciiIntRange(min=1),
    help="At most this many decoder layers in one shard (default: no limit but the size).",
)
@click.option(
    "--size-budget",
    "size_budget_mb",
    type=FiniteFloat(above=0),
    default=DEFAULT_SIZE_BUDGET_BYTES / 1e6,
    show_default=True,
    help="Largest package in MB, estimated from the architecture. The default follows "
    "documented limits: iOS refuses a model file above about 1 GB, and on macOS models "
    "above about 1.4 GB are reported to run on the GPU although the compute plan prefers "
    "the ANE. Phi-4-mini INT8: about 101 MB per layer, so 9 layers at most.",
)
@backend_option
@click.option(
    "--report-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("artifacts/plan"),
    show_default=True,
    help="Where every tried range's package and report are kept; also the cache a re-run reuses.",
)
@click.option(
    "-o",
    "--output",
    "manifest_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Manifest of the chosen topology (default: REPORT_DIR/manifest.json). Its folder "
    "must contain REPORT_DIR.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing manifest, and packages in REPORT_DIR the plan cache does not know.",
)
@report_only_option
@click.option(
    "--no-rebalance",
    is_flag=True,
    help="Stop at the first passing topology found by splitting (fewer exports, no "
    "optimality guarantee).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The plan's report page, one self-contained HTML file (default: beside the "
    "manifest, MANIFEST_NAME.html).",
)
@cache_dir_option
def plan(
    model_dir: Path,
    config_path: Path | None,
    max_layers_per_shard: int | None,
    size_budget_mb: float,
    backend: str,
    report_dir: Path,
    manifest_path: Path | None,
    overwrite: bool,
    report_only: bool,
    no_rebalance: bool,
    html_path: Path | None,
    cache_dir: Path | None,
) -> None:
    """Find the fastest topology that passes every gate, and write its manifest.

    Starts from the fewest shards the limits allow, split evenly; exports and validates
    each range (golden parity, plus residency where it can be checked); splits a failing
    range where its first NaN/Inf appeared (else in half) until every range passes, then
    re-balances: fewest shards first, then the smallest largest shard. A single layer that
    fails on its own ends the plan with exit 1. Every package and report is kept in
    REPORT_DIR and reused by a later run with the same inputs. Progress goes to stderr;
    the chosen topology, its manifest and a table of every range tried to stdout.

    \b
    Examples:
      anechain plan --model ~/models/Phi-4-mini-instruct --max-layers-per-shard 8 \\
          --report-dir artifacts/plan
      anechain plan --model artifacts/tiny-ckpt --config configs/tiny.yaml --backend mil \\
          --max-layers-per-shard 3 --report-dir artifacts/tiny-plan -o artifacts/tiny.json
    """
    from anechain.checkpoint import Checkpoint
    from anechain.manifest_render import render_manifest
    from anechain.plan import (
        PlanError,
        PlanLimits,
        check_plan_outputs,
        layers_per_shard_limit,
        plan_topology,
    )
    from anechain.validate import ResidencyOptions

    out = manifest_path or report_dir / "manifest.json"
    html_path = html_path or out.with_suffix(".html")
    check_outputs(out, html_path)
    try:
        check_plan_outputs(report_dir, out, overwrite)
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="-o/--output") from None
    config = resolve_config(config_path)
    checkpoint = Checkpoint(model_dir)
    limits = PlanLimits(max_layers_per_shard, int(size_budget_mb * 1e6))
    try:
        most = layers_per_shard_limit(checkpoint.architecture, limits, config.export.quantization)
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="--size-budget") from None

    say = progress_printer()
    arch, quant = checkpoint.architecture, config.export.quantization
    say(
        f"{arch.num_hidden_layers} decoder layers, at most {most} per shard "
        f"(about {human_bytes(estimate_shard_bytes(arch, 1, quant))} per layer, "
        f"budget {human_bytes(limits.size_budget_bytes or 0)}); packages and reports in "
        f"{report_dir}"
    )
    from anechain.html_model import plan_failure_page, plan_page
    from anechain.html_report import write_page

    try:
        outcome = plan_topology(
            checkpoint,
            report_dir,
            config.export,
            config.validation,
            limits,
            backend=backend,
            residency=ResidencyOptions(config.residency, report_only=report_only),
            manifest_path=out,
            overwrite=overwrite,
            rebalance=not no_rebalance,
            cache_dir=cache_dir,
            progress=say,
        )
    except PlanError as exc:
        if exc.attempts:  # what was tried and why it failed, as a page too
            write_page(html_path, plan_failure_page(exc, arch.num_hidden_layers))
            click.echo(f"report page: {html_path}", err=True)
        raise
    search = outcome.search
    sizes = "/".join(str(r.num_layers) for r in search.topology)
    click.echo(
        f"chosen topology: {' '.join(map(str, search.topology))} "
        f"({len(search.topology)} shards, {sizes} layers)"
    )
    click.echo(f"manifest: {outcome.manifest_path}")
    click.echo("")
    click.echo(render_manifest(outcome.manifest, outcome.manifest_path))
    click.echo("")
    click.echo(f"ranges tried ({len(search.attempts)}):")
    click.echo(render_attempts(search.attempts, arch, quant))
    write_page(html_path, plan_page(outcome, arch.num_hidden_layers))
    click.echo(f"report page: {html_path}", err=True)


COMMANDS = [plan]
