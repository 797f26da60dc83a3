"""`anechain compile` and `anechain residency`: the stages that need macOS (or a saved plan)."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli._common import progress_printer, render_table, resolve_config


@click.command("compile")
@click.argument(
    "packages",
    metavar="PKG...",
    nargs=-1,
    required=True,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the .mlmodelc folders (default: beside each package).",
)
@click.option(
    "--overwrite", is_flag=True, help="Recompile even when the compiled model is up to date."
)
def compile_cmd(packages: tuple[Path, ...], out_dir: Path | None, overwrite: bool) -> None:
    """Compile .mlpackage shards to .mlmodelc with the Core ML compiler (macOS 15+).

    Each PKG becomes <stem>.mlmodelc, written atomically. A compiled model whose recorded
    source digest matches its package is up to date and skipped; a stale one is replaced.

    \b
    Examples:
      anechain compile artifacts/s0.mlpackage artifacts/s1.mlpackage
      anechain compile artifacts/*.mlpackage --out build/compiled
      anechain compile artifacts/s0.mlpackage --overwrite
    """
    from anechain.compile import compile_package, compiled_path_for, default_compiler

    seen: dict[Path, Path] = {}
    for pkg in packages:
        if pkg.suffix != ".mlpackage":
            raise click.BadParameter(f"{pkg} is not an .mlpackage", param_hint="PKG")
        dest = compiled_path_for(pkg, out_dir).resolve()
        if dest in seen:
            raise click.BadParameter(
                f"{seen[dest]} and {pkg} would both compile to {dest}", param_hint="PKG"
            )
        seen[dest] = pkg

    from anechain.cli._common import check_outputs

    check_outputs(folders=tuple(seen))
    compiler = default_compiler()  # refuses early, before any work, off macOS
    say = progress_printer()
    rows = []
    for n, pkg in enumerate(packages, start=1):
        say(f"[{n}/{len(packages)}] {pkg}")
        result = compile_package(pkg, out_dir, overwrite, compiler=compiler)
        say(
            f"[{n}/{len(packages)}] {'up to date' if result.skipped else 'compiled'}: "
            f"{result.compiled}"
        )
        rows.append(
            [
                str(result.package),
                str(result.compiled),
                "up to date" if result.skipped else "compiled",
                f"{result.seconds:.1f}s",
            ]
        )
    click.echo(render_table(["package", "compiled", "status", "time"], rows))


@click.command("residency")
@click.argument(
    "model",
    metavar="[COMPILED_OR_PKG]",
    required=False,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
)
@click.option(
    "--compute-plan",
    "plan_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Replay a saved compute plan (any OS) instead of asking Core ML.",
)
@click.option(
    "--save-plan",
    "save_to",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the compute plan as JSON, for replay elsewhere.",
)
@click.option(
    "--report-only",
    is_flag=True,
    help="Show the counts without enforcing the gate (machines without an ANE).",
)
@click.option(
    "--compute-units",
    type=click.Choice(["cpu_and_ne", "all"]),
    default="cpu_and_ne",
    show_default=True,
    help="Compute units Core ML plans for.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="anechain YAML config whose `residency` section sets the gate (default: strict).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the residency report as JSON.",
)
def residency_cmd(
    model: Path | None,
    plan_file: Path | None,
    save_to: Path | None,
    report_only: bool,
    compute_units: str,
    config_path: Path | None,
    json_out: Path | None,
) -> None:
    """Check that every op of a shard is planned for the Neural Engine.

    COMPILED_OR_PKG is an .mlmodelc (or an .mlpackage, compiled to a temporary folder). Core
    ML's compute plan (macOS 14.4+) gives each op's preferred device; the strict gate needs
    every conv and every compute op on the ANE. Exit 1 if the gate fails. A plan saved with
    --save-plan replays on any OS with --compute-plan; given COMPILED_OR_PKG too, the plan
    must belong to it.

    \b
    Examples:
      anechain residency artifacts/s0.mlmodelc --save-plan artifacts/s0.plan.json
      anechain residency artifacts/s0.mlmodelc --report-only     # hosted CI, no ANE
      anechain residency --compute-plan artifacts/s0.plan.json  # replay, any OS
    """
    from anechain.cli._common import check_outputs
    from anechain.errors import PlatformError
    from anechain.jsonio import atomic_write_json
    from anechain.residency import (
        MIN_MACOS,
        STATUS_NOT_CHECKED,
        check_residency,
        live_plan_available,
    )

    if model is None and plan_file is None:
        raise click.UsageError("give COMPILED_OR_PKG, or a saved plan with --compute-plan FILE")
    if model is not None and model.suffix not in (".mlmodelc", ".mlpackage"):
        raise click.BadParameter(
            f"{model} is neither an .mlmodelc nor an .mlpackage", param_hint="COMPILED_OR_PKG"
        )
    if save_to is not None and plan_file is None and not live_plan_available():
        raise click.BadParameter(
            "this machine cannot read a live compute plan (macOS 14.4+), so there is none "
            "to save; replay a saved one with --compute-plan",
            param_hint="--save-plan",
        )
    check_outputs(save_to, json_out)
    settings = resolve_config(config_path).residency
    say = progress_printer()
    say(f"replaying {plan_file}" if plan_file else f"reading the compute plan of {model}")
    report = check_residency(
        model,
        settings,
        plan_file=plan_file,
        save_plan_to=save_to,
        report_only=report_only,
        compute_units=compute_units,
    )
    if report.status == STATUS_NOT_CHECKED:
        need = ".".join(map(str, MIN_MACOS))
        raise PlatformError(
            f"reading a Core ML compute plan needs macOS {need}+; on this "
            "machine replay a saved one with --compute-plan FILE"
        )
    if save_to is not None:
        say(f"saved the compute plan to {save_to}")
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())

    c = report.counts
    assert c is not None  # checked or report_only always carry counts
    share = "-" if report.ane_cost_share is None else f"{100 * report.ane_cost_share:.1f}%"
    rows = [
        ["conv on ANE", f"{c.conv_ane}/{c.conv_total}"],
        ["compute ops on ANE", f"{c.compute_ane}/{c.compute_total}"],
        ["compute ops off ANE", str(c.compute_non_ane)],
        ["ops (incl. const)", str(c.ops_total)],
        ["by device", ", ".join(f"{d} {n}" for d, n in c.by_device.items())],
        ["ANE share of est. cost", share],
    ]
    click.echo(render_table(["residency", "value"], rows))
    if report.non_ane_ops:
        click.echo()
        click.echo(
            render_table(
                ["non-ANE op", "name", "preferred", "supported"],
                [
                    [op.type, op.name, op.preferred or "-", ",".join(op.supported) or "-"]
                    for op in report.non_ane_ops
                ],
            )
        )
    click.echo()
    if report.status == "report_only":
        verdict = "would pass" if not report.failures else "would FAIL"
        click.echo(f"gate not enforced (report only): {verdict}")
        for reason in report.failures:
            click.echo(f"  - {reason}")
        return
    if report.passed:
        click.echo("residency: PASS")
        return
    click.echo("residency: FAIL")
    for reason in report.failures:
        click.echo(f"  - {reason}")
    click.get_current_context().exit(1)


COMMANDS = [compile_cmd, residency_cmd]
