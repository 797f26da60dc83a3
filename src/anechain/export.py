"""Export decoder-layer ranges as fused, stateful, INT8 Core ML packages.

trace (torch.jit) -> ct.convert (ML Program, iOS18, fp16, KV states) -> INT8 per-channel
weights (projections only) -> metadata -> save into a temporary folder -> rename.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anechain import __version__
from anechain.checkpoint import Checkpoint
from anechain.config import ExportSettings, LayerRange
from anechain.contract import (
    KIND_HEAD,
    KIND_LAYERS,
    IOContract,
    ShardMetadata,
    head_contract,
    layer_contract,
)
from anechain.errors import ExportError
from anechain.fsutil import atomic_path, isolated_tempdir
from anechain.head import head_tensor_names
from anechain.model import LayerRangeModel, LMHeadModel
from anechain.package import package_size
from anechain.rope import RopeParameters

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LayerSpec:
    """One shard to export: a layer range and where its package goes."""

    layers: LayerRange
    path: Path


@dataclass
class ExportResult:
    path: Path
    layers: LayerRange | None  # None for the head
    op_counts: dict[str, int]
    quantized_weights: int
    size_bytes: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    kind: str = KIND_LAYERS  # "layers" | "head" | "embedding"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "layers": str(self.layers) if self.layers else None,
            "op_counts": dict(self.op_counts),
            "quantized_weights": self.quantized_weights,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
        }


def _example_inputs(contract: IOContract) -> tuple[torch.Tensor, ...]:
    # fp32 example inputs: the module is traced in fp32 and converted with fp16 compute.
    out = []
    for spec in contract.inputs:
        if spec.dtype == "int32":
            out.append(torch.zeros(spec.shape, dtype=torch.int32))
        else:
            out.append(torch.zeros(spec.shape, dtype=torch.float32))
    return tuple(out)


def _convert(traced: Any, contract: IOContract) -> Any:
    import coremltools as ct

    inputs = [
        ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type)
        for s in contract.inputs
    ]
    outputs = [ct.TensorType(name=s.name, dtype=np.dtype(s.dtype).type) for s in contract.outputs]
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=s.shape, dtype=np.float16), name=s.name)
        for s in contract.states
    ]
    return ct.convert(
        traced,
        inputs=inputs,
        outputs=outputs,
        states=states or None,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )


def _quantize_int8(mlmodel: Any) -> Any:
    """Per-output-channel symmetric INT8 for conv weights only.

    Restricted by op type: in the conv layout the RMSNorm gains (1, C, 1, 1) would exceed
    the default size threshold and be quantized too; they must stay fp16.
    """
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
    )

    op_config = OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
    )
    config = OptimizationConfig(global_config=None, op_type_configs={"conv": op_config})
    return linear_quantize_weights(mlmodel, config=config)


def program_op_counts(prog: Any) -> Counter[str]:
    """Op types in the main function, nested blocks included."""
    counts: Counter[str] = Counter()

    def walk(ops: Any) -> None:
        for op in ops:
            counts[op.op_type] += 1
            for block in getattr(op, "blocks", ()):
                walk(block.operations)

    walk(prog.functions["main"].operations)
    return counts


def _build_package(
    module: torch.nn.Module,
    checkpoint: Checkpoint,
    kind: str,
    layers: LayerRange | None,
    tensor_names: list[str],
    contract: IOContract,
    dest: Path,
    settings: ExportSettings,
    expected_conv: int,
    description: str,
    overwrite: bool,
    say: Progress,
    t0: float,
    extra: dict[str, str] | None = None,
) -> ExportResult:
    """trace -> convert -> INT8 -> check the program -> metadata -> atomic save."""
    label = f"[{layers or kind}]"
    meta = ShardMetadata(
        version=__version__,
        kind=kind,
        layers=layers,
        num_hidden_layers=checkpoint.architecture.num_hidden_layers,
        checkpoint_fingerprint=checkpoint.fingerprint,
        weights_fingerprint=checkpoint.weights_fingerprint(tensor_names),
        quantization=settings.quantization,
        context_length=settings.context_length,
        architecture=checkpoint.architecture,
        contract=contract,
        extra={**(extra or {}), **_rope_metadata(checkpoint)},
    )
    t = time.perf_counter()
    stages: dict[str, float] = {"load": t - t0}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = now - since
        say(f"{label} {name} done in {now - since:.1f}s")
        return now

    with torch.no_grad():
        traced = torch.jit.trace(module, _example_inputs(contract), check_trace=False)
    t = stage("trace", t)
    try:
        mlmodel = _convert(traced, contract)
    except Exception as exc:
        raise ExportError(f"{label} conversion failed: {exc}") from exc
    del traced
    gc.collect()
    t = stage("convert", t)

    if settings.quantization == "int8":
        try:
            mlmodel = _quantize_int8(mlmodel)
        except Exception as exc:
            raise ExportError(f"{label} INT8 quantization failed: {exc}") from exc
        gc.collect()
        t = stage("quantize", t)

    counts = program_op_counts(mlmodel._mil_program)
    if counts["conv"] != expected_conv or counts["linear"]:
        raise ExportError(
            f"{label} unexpected program: {counts['conv']} conv ops (want {expected_conv}), "
            f"{counts['linear']} linear"
        )
    quantized = counts["constexpr_blockwise_shift_scale"]
    if settings.quantization == "int8" and quantized != expected_conv:
        raise ExportError(f"{label} {quantized} INT8 weights in the program, want {expected_conv}")

    mlmodel.user_defined_metadata.update(meta.to_user_metadata())
    mlmodel.short_description = description
    mlmodel.version = __version__
    with atomic_path(dest, overwrite=overwrite) as tmp:
        mlmodel.save(str(tmp))
    del mlmodel
    gc.collect()
    stage("save", t)
    return ExportResult(
        path=dest,
        layers=layers,
        op_counts=dict(counts),
        quantized_weights=quantized,
        size_bytes=package_size(dest),
        seconds=time.perf_counter() - t0,
        stage_seconds=stages,
        kind=kind,
    )


def _rope_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """LongRoPE frequencies and scaling, so a runtime can build cos/sin without the checkpoint."""
    rope = RopeParameters.from_hf_config(checkpoint.hf_config)
    return {"rope": json.dumps(rope.to_dict(), sort_keys=True)}


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.suffix != ".mlpackage":
        raise ExportError(f"{dest}: the output must end in .mlpackage")
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it")


@isolated_tempdir("spec")
def export_shard(
    checkpoint: Checkpoint,
    spec: LayerSpec,
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export one layer range to one .mlpackage, atomically."""
    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    layers = spec.layers
    layers.check_within(arch.num_hidden_layers)
    checkpoint.check_layers(layers, settings.context_length)
    _check_dest(spec.path, overwrite)

    t0 = time.perf_counter()
    contract = layer_contract(arch, settings.context_length, layers.num_layers)
    say(f"[{layers}] reading {layers.num_layers} layers from {checkpoint.path}")
    names = checkpoint.layer_tensor_names(layers)
    tensors = checkpoint.read_tensors(names)
    model = LayerRangeModel(arch, layers, settings.context_length).eval()
    model.load_hf_layer_weights(tensors)
    del tensors
    return _build_package(
        model,
        checkpoint,
        KIND_LAYERS,
        layers,
        names,
        contract,
        spec.path,
        settings,
        4 * layers.num_layers,
        f"Phi-4-mini decoder layers [{layers.start}, {layers.end}) for single-token decode, "
        f"{settings.quantization} weights, KV cache as state",
        overwrite,
        say,
        t0,
    )


@isolated_tempdir("dest")
def export_head(
    checkpoint: Checkpoint,
    dest: Path,
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export the final RMSNorm + chunked LM head (INT8 like the layers)."""
    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    checkpoint.check_tensors(head_tensor_names(checkpoint))
    _check_dest(dest, overwrite)
    t0 = time.perf_counter()
    say(f"[head] reading the final norm and LM head from {checkpoint.path}")
    names = head_tensor_names(checkpoint)
    tensors = checkpoint.read_tensors(names)
    model = LMHeadModel(arch, settings.head_chunk_rows).eval()
    model.load_hf_weights(tensors[names[0]], tensors[names[1]])
    del tensors
    n_chunks = len(model.chunks)
    return _build_package(
        model,
        checkpoint,
        KIND_HEAD,
        None,
        list(names),
        head_contract(arch, n_chunks),
        dest,
        settings,
        n_chunks,
        f"Phi-4-mini final norm + LM head in {n_chunks} chunks of <= "
        f"{settings.head_chunk_rows} rows, each returning its max logit and argmax",
        overwrite,
        say,
        t0,
        extra={"head_chunk_rows": str(settings.head_chunk_rows)},
    )


def export_embedding(
    checkpoint: Checkpoint,
    dest: Path,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """The token embedding as an fp16 .npy table the host gathers rows from (mmap-able).

    Phi-4-mini ties it with the LM head; the head package holds its own INT8 copy.
    """
    say = progress or (lambda msg: log.info(msg))
    if dest.suffix != ".npy":
        raise ExportError(f"{dest}: the embedding table must end in .npy")
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    name = "model.embed_tokens.weight"
    checkpoint.check_tensors([name])
    say(f"[embedding] reading {name} from {checkpoint.path}")
    table = checkpoint.read_tensors([name])[name].to(torch.float16).numpy()  # (vocab, hidden)
    with atomic_path(dest, overwrite=overwrite, expected_bytes=table.nbytes) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
    say(f"[embedding] {table.shape[0]} x {table.shape[1]} fp16 written")
    return ExportResult(
        path=dest,
        layers=None,
        op_counts={},
        quantized_weights=0,
        size_bytes=dest.stat().st_size,
        seconds=time.perf_counter() - t0,
        kind="embedding",
    )


def export_shards(
    checkpoint: Checkpoint,
    specs: list[LayerSpec],
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[ExportResult]:
    """Export several ranges one after another, freeing memory in between.

    Every spec is checked before the first (slow) export starts.
    """
    arch = checkpoint.architecture
    seen: dict[Path, LayerSpec] = {}
    for spec in specs:
        spec.layers.check_within(arch.num_hidden_layers)
        key = spec.path.resolve()
        if key in seen:
            raise ExportError(f"two layer specs write {spec.path}")
        seen[key] = spec
        if spec.path.exists() and not overwrite:
            raise ExportError(f"{spec.path} already exists; pass --overwrite to replace it")
    results = []
    for n, spec in enumerate(specs, start=1):
        if progress:
            progress(f"shard {n}/{len(specs)}: layers {spec.layers} -> {spec.path}")
        results.append(export_shard(checkpoint, spec, settings, overwrite, progress))
        gc.collect()
    return results
