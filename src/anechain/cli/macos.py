"""`anechain compile`, `residency` and `capture`: the stages that need macOS (or a saved plan)."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli._common import (
    AsciiIntRange,
    InputFile,
    cache_dir_option,
    config_option,
    human_bytes,
    model_option,
    progress_printer,
    render_table,
    resolve_config,
)
from anechain.config import SEED_MAX


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
    metavar="PKG_OR_COMPILED",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
)
@click.option(
    "--compute-plan",
    "plan_file",
    type=InputFile(),
    help="Replay a saved compute plan (any OS) instead of asking Core ML; it must match "
    "PKG_OR_COMPILED's program.",
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
    help="Show the counts without enforcing the gate (automatic on a Mac without an ANE).",
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
    type=InputFile(),
    help="anechain YAML config whose `residency` section sets the gate (default: strict).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the residency report as JSON.",
)
def residency_cmd(
    model: Path,
    plan_file: Path | None,
    save_to: Path | None,
    report_only: bool,
    compute_units: str,
    config_path: Path | None,
    json_out: Path | None,
) -> None:
    """Check that a shard's fp16 work is planned for the Neural Engine.

    PKG_OR_COMPILED is an .mlpackage (compiled to a temporary folder) or an .mlmodelc
    compiled by `anechain compile` (its sidecar names the package). Core ML's compute plan
    (macOS 14.4+) gives each op's preferred device; the package's program gives each op's
    class. The strict gate needs every conv and every fp16 compute op on the ANE, and
    bounds plumbing (int32 index ops, state read/write) off the ANE by its share of the
    plan (`residency.max_plumbing_share`). Exit 1 if the gate fails. A plan saved with
    --save-plan replays on any OS with --compute-plan, checked against the program.

    \b
    Examples:
      anechain residency artifacts/s0.mlmodelc --save-plan artifacts/s0.plan.json
      anechain residency artifacts/s0.mlpackage --report-only     # count, don't gate
      anechain residency artifacts/s0.mlpackage --compute-plan artifacts/s0.plan.json
    """
    from anechain.cli._common import check_outputs
    from anechain.errors import PlatformError
    from anechain.jsonio import atomic_write_json
    from anechain.residency import STATUS_NOT_CHECKED, check_residency, live_plan_available
    from anechain.residency import render as r

    if model.suffix not in (".mlmodelc", ".mlpackage"):
        raise click.BadParameter(
            f"{model} is neither an .mlmodelc nor an .mlpackage", param_hint="PKG_OR_COMPILED"
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
        raise PlatformError(
            f"reading a Core ML compute plan {report.reason}; on this machine replay a saved "
            "one with --compute-plan FILE"
        )
    if save_to is not None:
        say(f"saved the compute plan to {save_to}")
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())

    click.echo(render_table(["residency", "value"], r.summary_rows(report)))
    for headers, rows in (
        (r.NON_ANE_HEADERS, r.non_ane_rows(report)),
        (r.PLUMBING_HEADERS, r.plumbing_rows(report)),
        (r.CHANGE_HEADERS, r.change_rows(report)),
    ):
        if rows:
            click.echo()
            click.echo(render_table(headers, rows))
    click.echo()
    for line in r.verdict_lines(report):
        click.echo(line)
    if report.status != STATUS_NOT_CHECKED and report.passed is False:
        click.get_current_context().exit(1)


@click.command("capture")
@click.argument(
    "packages",
    metavar="PKG...",
    nargs=-1,
    required=True,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
)
@model_option()
@config_option("anechain YAML config: validation and residency settings (default: phi-4-mini).")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the bundles (<stem>.capture.json).",
)
@click.option(
    "--random-preset",
    help="The checkpoint is `random-checkpoint --preset NAME --seed SEED` (checked by remaking "
    "it), so a replay can remake it; give with --random-seed.",
)
@click.option("--random-seed", type=AsciiIntRange(0, SEED_MAX), help="See --random-preset.")
@cache_dir_option
def capture_cmd(
    packages: tuple[Path, ...],
    model_dir: Path,
    config_path: Path | None,
    out_dir: Path,
    random_preset: str | None,
    random_seed: int | None,
    cache_dir: Path | None,
) -> None:
    """Capture Core ML's ground truth for packages, to replay on any OS (macOS 15+).

    For each PKG: the compute plan with its estimated costs, the program, the golden run's
    inputs and Core ML's outputs and states on CPU_AND_NE and on CPU_ONLY, the results, and
    the machine (chip, macOS, coremltools, Neural Engine cores), in one JSON file. Bundles
    of the tiny model copied into tests/data/captures/ become tests on Linux.

    \b
    Examples:
      anechain capture artifacts/build/*.mlpackage --model artifacts/build/checkpoint \\
          --config configs/tiny.yaml --random-preset tiny --random-seed 0 --out captures
    """
    from anechain.capture import capture_package, verify_random_recipe
    from anechain.checkpoint import Checkpoint
    from anechain.cli._common import check_outputs
    from anechain.platform import require_macos

    if (random_preset is None) != (random_seed is None):
        raise click.UsageError("give --random-preset and --random-seed together")
    for pkg in packages:
        if pkg.suffix != ".mlpackage":
            raise click.BadParameter(f"{pkg} is not an .mlpackage", param_hint="PKG")
    check_outputs(*(out_dir / f"{p.stem}.capture.json" for p in packages))
    require_macos("capturing Core ML results", (15,))
    config = resolve_config(config_path)
    checkpoint = Checkpoint(model_dir)
    recipe = None
    if random_preset is not None and random_seed is not None:
        recipe = verify_random_recipe(checkpoint, random_preset, random_seed)
    say = progress_printer()
    rows = []
    for pkg in packages:
        path = capture_package(
            pkg,
            checkpoint,
            config,
            out_dir,
            random_recipe=recipe,
            cache_dir=cache_dir,
            progress=say,
        )
        rows.append([str(pkg), str(path), human_bytes(path.stat().st_size)])
    click.echo(render_table(["package", "bundle", "size"], rows))


COMMANDS = [compile_cmd, residency_cmd, capture_cmd]
