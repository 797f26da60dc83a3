"""`anechain manifest build | verify | show`."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli import AnechainGroup
from anechain.cli._common import InputFile, config_option


@click.group("manifest", cls=AnechainGroup)
def manifest_group() -> None:
    """Build, verify and show the runtime manifest that chains validated shards."""


@manifest_group.command("build")
@click.argument("shards", nargs=-1, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--report",
    "reports",
    multiple=True,
    type=InputFile(),
    help="A shard's validation report (JSON). Repeatable.",
)
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Manifest to write; every shard must be inside its folder.",
)
@click.option(
    "--embedding",
    type=InputFile(),
    help="The fp16 token table (.npy) from `anechain export --embedding`.",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="The checkpoint folder: its tokenizer files are copied into tokenizer/ beside OUT "
    "and hashed in the manifest (for `generate --prompt`).",
)
@config_option(
    "YAML config whose validation gates every report must meet or beat (default: Phi-4-mini's)."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def build(
    shards: tuple[Path, ...],
    reports: tuple[Path, ...],
    out: Path,
    embedding: Path | None,
    tokenizer_dir: Path | None,
    config_path: Path | None,
    overwrite: bool,
) -> None:
    """Write a manifest for validated shards, given as reports and/or packages.

    A package SHARD (NAME.mlpackage) is read through its report beside it,
    NAME.report.json, as `anechain validate shard` writes it (a SHARD may also be a
    report). Shards may come in any order. Each report's gates are recomputed from their
    values (its pass flags are not trusted); it must hold every mandatory gate, with bounds
    at least as strict as the config's (recorded in the manifest), and pass them all. The
    shards must be unchanged since validation, share one I/O contract and cover the model's
    decoder layers exactly once. The head (from
    `anechain export --head`, validated like a shard) may be given the same way, and the
    embedding table with --embedding, and the checkpoint's tokenizer with --tokenizer
    (copied into tokenizer/ beside OUT). Paths in the manifest are relative to it, so the
    files must sit in its folder (or below).

    \b
    Examples:
      anechain manifest build artifacts/layers_*.mlpackage artifacts/head.mlpackage \\
          --embedding artifacts/embedding.npy --tokenizer ckpt -o artifacts/manifest.json
      anechain manifest build --report artifacts/layers_0_8.report.json \\
          --report artifacts/layers_8_32.report.json -o artifacts/manifest.json --overwrite
    """
    from anechain.cli._common import check_outputs, human_bytes, resolve_config
    from anechain.manifest_build import build_manifest

    sources = [*reports, *shards]
    if not sources:
        raise click.UsageError("give shard packages or --report files to build from")
    check_outputs(out)
    if out.exists() and not overwrite:
        raise click.UsageError(f"{out} already exists; pass --overwrite to replace it")
    config = resolve_config(config_path)
    if tokenizer_dir is not None:
        from anechain.tokenizer import tokenizer_files

        if not tokenizer_files(tokenizer_dir):
            raise click.BadParameter(
                f"{tokenizer_dir} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
                param_hint="--tokenizer",
            )
    manifest = build_manifest(
        sources,
        out,
        overwrite=overwrite,
        embedding=embedding,
        gates=config.validation.gates,
        residency=config.residency,
        validation=config.validation,
        tokenizer=tokenizer_dir,
    )
    size = sum(s.package.size_bytes for s in manifest.shards)
    ranges = ", ".join(str(s.layers) for s in manifest.shards)
    tok = f", tokenizer ({len(manifest.tokenizer.files)} files)" if manifest.tokenizer else ""
    click.echo(f"wrote {out}: {len(manifest.shards)} shards ({ranges}), {human_bytes(size)}{tok}")


@manifest_group.command("verify")
@click.argument("manifest", type=InputFile())
def verify(manifest: Path) -> None:
    """Check a manifest: schema, coverage, contract, paths, and every file's sha256.

    Exits 1 naming the first problem, 0 with one OK line otherwise.

    \b
    Example:
      anechain manifest verify artifacts/manifest.json
    """
    from anechain.manifest import verify_manifest

    checks = verify_manifest(manifest)
    hashed = sum(c.name == "sha256" for c in checks)
    coverage = next(c.detail for c in checks if c.name == "coverage")
    click.echo(f"OK {manifest}: {coverage}, {hashed} files match their sha256")


@manifest_group.command("show")
@click.argument("manifest", type=InputFile())
def show(manifest: Path) -> None:
    """Print a manifest's topology: ranges, sizes, gate bounds and results, residency status.

    Reads and checks the manifest's schema and paths but does not hash files; use
    `anechain manifest verify` for that.

    \b
    Example:
      anechain manifest show artifacts/manifest.json
    """
    from anechain.manifest import load_manifest
    from anechain.manifest_render import render_manifest

    click.echo(render_manifest(load_manifest(manifest), manifest))


COMMANDS = [manifest_group]
