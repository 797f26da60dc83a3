"""`anechain export`."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli._common import (
    AsciiIntRange,
    LayerSpecType,
    check_outputs,
    config_option,
    human_bytes,
    model_option,
    progress_printer,
    render_table,
    resolve_config,
    with_options,
)


def _multiple_of_32(value: int | None) -> int | None:
    if value is not None and value % 32:
        raise click.BadParameter(f"{value} is not a multiple of 32 (ANE-friendly state shapes)")
    return value


@click.command("export")
@model_option()
@click.option(
    "--layer-spec",
    "specs",
    multiple=True,
    type=LayerSpecType(),
    help="START:END:PATH: decoder layers [START, END) into PATH (.mlpackage). Repeatable.",
)
@click.option(
    "--head",
    "head_path",
    type=click.Path(path_type=Path),
    help="Also export the final norm + chunked LM head to this .mlpackage.",
)
@click.option(
    "--embedding",
    "embedding_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the token embedding as an fp16 table to this .npy.",
)
@config_option("anechain YAML config (default: the phi-4-mini preset's export settings).")
@click.option(
    "--context",
    type=AsciiIntRange(min=32),
    default=None,
    callback=lambda ctx, param, v: _multiple_of_32(v),
    help="Context length (KV cache size, a multiple of 32); overrides the config.",
)
@click.option(
    "--quantization",
    type=click.Choice(["int8", "none"]),
    default=None,
    help="Weight format; overrides the config (default int8).",
)
@click.option(
    "--prefill-tokens",
    type=AsciiIntRange(min=0),
    default=None,
    help="Tokens per call of each shard's prefill function (beside decode, sharing the "
    "weights and KV states); 0 exports decode only. Overrides the config.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing packages.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the summary as JSON.",
)
def export(
    model_dir: Path,
    specs: tuple,
    head_path: Path | None,
    embedding_path: Path | None,
    config_path: Path | None,
    context: int | None,
    quantization: str | None,
    prefill_tokens: int | None,
    overwrite: bool,
    json_out: Path | None,
) -> None:
    """Export fused, stateful, INT8 layer-range shards as Core ML packages.

    Each --layer-spec produces one ML Program (iOS18/macOS15, fp16 compute) holding decoder
    layers [START, END) for single-token decode, with the KV cache as Core ML state and
    every projection a 1x1 conv. --head adds the final norm + LM head (INT8, the vocabulary
    in chunks of at most 16384 rows, each returning its max logit and argmax) and
    --embedding the fp16 token table the host gathers from. Everything is written atomically.

    \b
    Examples:
      anechain export --model ckpt --config configs/phi-4-mini.yaml \\
          --layer-spec 0:8:artifacts/layers_0_8.mlpackage \\
          --layer-spec 24:30:artifacts/layers_24_30.mlpackage \\
          --layer-spec 30:32:artifacts/layers_30_32.mlpackage
      anechain export --model artifacts/tiny-ckpt --config configs/tiny.yaml \\
          --layer-spec 0:3:artifacts/tiny_0_3.mlpackage \\
          --head artifacts/tiny_head.mlpackage --embedding artifacts/tiny_embedding.npy
    """
    from anechain.checkpoint import Checkpoint
    from anechain.export import export_embedding, export_head, export_shards

    if not (specs or head_path or embedding_path):
        raise click.UsageError("nothing to export: give --layer-spec, --head or --embedding")
    if head_path is not None and head_path.suffix != ".mlpackage":
        raise click.BadParameter(f"{head_path} must end in .mlpackage", param_hint="--head")
    if embedding_path is not None and embedding_path.suffix != ".npy":
        raise click.BadParameter(f"{embedding_path} must end in .npy", param_hint="--embedding")

    config = resolve_config(config_path)
    settings = with_options(
        config.export,
        context_length=("--context", context),
        quantization=("--quantization", quantization),
        prefill_tokens=("--prefill-tokens", prefill_tokens),
    )
    checkpoint = Checkpoint(model_dir)
    n_layers = checkpoint.architecture.num_hidden_layers
    limit = checkpoint.architecture.max_position_embeddings
    if settings.context_length > limit:
        raise click.BadParameter(
            f"{settings.context_length} is beyond {model_dir}'s max_position_embeddings ({limit})",
            param_hint="--context" if context is not None else "--config",
        )
    check_outputs(
        embedding_path, json_out, folders=(*(s.path for s in specs), *filter(None, [head_path]))
    )
    seen: dict[Path, str] = {}
    for spec in specs:
        label = f"{spec.layers}:{spec.path}"
        if spec.layers.end > n_layers:
            raise click.BadParameter(
                f"{label}: END is past the model's {n_layers} decoder layers",
                param_hint="--layer-spec",
            )
        key = spec.path.resolve()
        if key in seen:
            raise click.BadParameter(
                f"{label} and {seen[key]} write the same path", param_hint="--layer-spec"
            )
        seen[key] = label
        if spec.path.exists() and not overwrite:
            raise click.BadParameter(
                f"{label}: {spec.path} exists; pass --overwrite to replace",
                param_hint="--layer-spec",
            )
    for path, hint in ((head_path, "--head"), (embedding_path, "--embedding")):
        if path is None:
            continue
        if path.exists() and not overwrite:
            raise click.BadParameter(f"{path} exists; pass --overwrite to replace", param_hint=hint)
        if path.resolve() in seen:
            raise click.BadParameter(f"{path} is also a --layer-spec output", param_hint=hint)

    say = progress_printer()
    results = export_shards(checkpoint, list(specs), settings, overwrite, progress=say)
    if head_path is not None:
        results.append(export_head(checkpoint, head_path, settings, overwrite, progress=say))
    if embedding_path is not None:
        results.append(export_embedding(checkpoint, embedding_path, overwrite, progress=say))
    rows = [
        [
            str(r.path),
            str(r.layers or r.kind),
            str(r.op_counts.get("conv", 0)),
            str(r.quantized_weights),
            human_bytes(r.size_bytes),
            f"{r.seconds:.1f}s",
        ]
        for r in results
    ]
    click.echo(render_table(["package", "layers", "conv", "int8 weights", "size", "time"], rows))
    if json_out is not None:
        from anechain.jsonio import atomic_write_json

        atomic_write_json(json_out, [r.to_dict() for r in results], sort_keys=False)


COMMANDS = [export]
