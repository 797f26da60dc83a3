"""`anechain random-checkpoint` and `anechain import`."""

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
@click.option(
    "--seed",
    type=AsciiIntRange(0, SEED_MAX),
    default=0,
    show_default=True,
    help="Random seed: the same seed and preset give the same weights, bit for bit.",
)
@click.option(
    "--style",
    type=click.Choice(["trained", "flat"]),  # checkpoint.STYLES (not imported: torch)
    default="trained",
    show_default=True,
    help="trained: peaked attention, growing hidden states, massive activations on BOS; "
    "flat: near-uniform attention (the earlier random model, for comparison).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def random_checkpoint(
    out_dir: Path, preset: str, num_layers: int | None, seed: int, style: str, overwrite: bool
) -> None:
    """Write a random-weight Phi-4-mini-architecture checkpoint to OUT_DIR.

    Same format as a real Hugging Face checkpoint (config.json, sharded bf16 safetensors,
    index file), with trained-like weight scales, so tests, the demo and benchmarks use the
    same loading code as a real model. Its activation statistics (attention entropy,
    hidden-state growth, massive channels), measured with transformers, are written to
    OUT_DIR/random-checkpoint-stats.json.

    \b
    Examples:
      anechain random-checkpoint artifacts/tiny-ckpt --preset tiny
      anechain random-checkpoint artifacts/phi4-2l --preset phi-4-mini --num-layers 2
      anechain random-checkpoint artifacts/tiny-flat --style flat
    """
    import json

    from anechain.checkpoint import STATS_NAME, write_random_checkpoint

    arch = load_preset(preset).architecture
    if num_layers is not None:
        arch = dataclasses.replace(arch, num_hidden_layers=num_layers)
    check_outputs(folders=(out_dir,))
    if out_dir.exists() and not overwrite:
        raise click.UsageError(f"{out_dir} already exists; pass --overwrite to replace it")
    say = progress_printer()
    write_random_checkpoint(
        out_dir, arch, seed=seed, overwrite=overwrite, progress=say, style=style
    )
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    click.echo(
        f"wrote {out_dir} ({preset}, {style}, {arch.num_hidden_layers} layers, seed {seed}, "
        f"{human_bytes(size)})"
    )
    stats = json.loads((out_dir / STATS_NAME).read_text())
    for layer in stats["layers"]:
        ent = layer["attention_entropy"]
        click.echo(
            f"  layer {layer['layer']}: attention entropy {sum(ent) / len(ent):.2f} nats "
            f"(uniform {stats['uniform_entropy']:.2f}), hidden rms {layer['hidden_rms']:.2f}, "
            f"max |h| {layer['hidden_max_abs']:.1f} (channel {layer['top_channels'][0][0]})"
        )


@click.command("import")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),  # importer.DTYPES (torch-free here)
    default="bfloat16",
    show_default=True,
    help="Stored weight type: bfloat16 like real checkpoints; float32 keeps a dequantized "
    "GGUF exact.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def import_command(source: Path, out_dir: Path, dtype: str, overwrite: bool) -> None:
    """Import a Llama-architecture checkpoint (a HF folder or a GGUF file) as a Phi3 folder.

    A Llama decoder is a Phi3 one with full rotary and no rope scaling; q/k/v and gate/up
    are concatenated into qkv_proj and gate_up_proj. GGUF files are dequantized by
    transformers' own GGUF loader (the `gguf` package), q/k rows put back in HF's order,
    and their tokenizer written beside the weights. Nothing is downloaded. The result is an
    ordinary checkpoint folder for `export`, `validate`, `build` and `plan`.

    \b
    Examples:
      anechain import SmolLM2-135M-Instruct.Q4_1.gguf artifacts/smollm2
      anechain import path/to/llama-hf-folder artifacts/llama --dtype float16
      anechain build --model artifacts/smollm2 --config configs/smollm2.yaml
    """
    from anechain.importer import import_checkpoint

    check_outputs(folders=(out_dir,))
    if out_dir.exists() and not overwrite:
        raise click.UsageError(f"{out_dir} already exists; pass --overwrite to replace it")
    result = import_checkpoint(
        source, out_dir, dtype=dtype, overwrite=overwrite, progress=progress_printer()
    )
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    tokenizer = "with its tokenizer" if result.has_tokenizer else "no tokenizer"
    click.echo(
        f"wrote {out_dir} (phi3 from {result.source_format}, {result.num_hidden_layers} layers, "
        f"{result.parameters / 1e6:.1f}M parameters, {dtype}, {tokenizer}, {human_bytes(size)})"
    )


COMMANDS = [random_checkpoint, import_command]
