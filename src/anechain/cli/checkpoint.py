"""`anechain random-checkpoint`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from anechain.cli._common import AsciiIntRange, check_outputs, human_bytes, progress_printer
from anechain.config import PRESETS, SEED_MAX, load_preset


@click.command("random-checkpoint")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="tiny",
    show_default=True,
    help="Architecture to build.",
)
@click.option(
    "--num-layers",
    type=AsciiIntRange(min=1),
    default=None,
    help="Override the number of decoder layers (benchmarks).",
)
@click.option("--seed", type=AsciiIntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def random_checkpoint(
    out_dir: Path, preset: str, num_layers: int | None, seed: int, overwrite: bool
) -> None:
    """Write a random-weight Phi-4-mini-architecture checkpoint to OUT_DIR.

    Same format as a real Hugging Face checkpoint (config.json, sharded bf16 safetensors,
    index file), with trained-like weight scales, so tests, the demo and benchmarks use the
    same loading code as a real model.

    \b
    Examples:
      anechain random-checkpoint artifacts/tiny-ckpt --preset tiny
      anechain random-checkpoint artifacts/phi4-2l --preset phi-4-mini --num-layers 2
    """
    from anechain.checkpoint import write_random_checkpoint

    arch = load_preset(preset).architecture
    if num_layers is not None:
        arch = dataclasses.replace(arch, num_hidden_layers=num_layers)
    check_outputs(folders=(out_dir,))
    if out_dir.exists() and not overwrite:
        raise click.UsageError(f"{out_dir} already exists; pass --overwrite to replace it")
    say = progress_printer()
    write_random_checkpoint(out_dir, arch, seed=seed, overwrite=overwrite, progress=say)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    click.echo(
        f"wrote {out_dir} ({preset}, {arch.num_hidden_layers} layers, seed {seed}, "
        f"{human_bytes(size)})"
    )


COMMANDS = [random_checkpoint]
