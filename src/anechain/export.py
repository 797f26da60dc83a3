"""Export decoder-layer ranges as fused, stateful, INT8 Core ML packages.

Each projection tensor is read from the checkpoint, quantized to INT8 and placed in an ML
Program built directly with coremltools' MIL Builder (`anechain.program`); the program
is converted with no graph passes, checked, given its metadata and saved into a temporary
folder that is renamed into place. The package is a pure function of its inputs: the
same checkpoint and settings give byte-identical packages.

The traced torch path (`anechain._traced`: torch.jit.trace -> ct.convert -> INT8 pass) is
the executable specification, kept for the equivalence test and the benchmark only.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anechain import __version__
from anechain.checkpoint import Checkpoint
from anechain.config import ExportSettings, LayerRange
from anechain.contract import (
    DECODE_ONLY,
    KIND_HEAD,
    KIND_LAYERS,
    IOContract,
    ShardMetadata,
    function_names,
    head_contract,
    layer_contract,
)
from anechain.errors import ExportError
from anechain.fsutil import atomic_path, isolated_tempdir
from anechain.head import head_tensor_names
from anechain.package import package_size
from anechain.rope import RopeParameters

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Metadata key: JSON list of each layer's output var in `main`, in layer order.
LAYER_OUTPUTS_KEY = "layer_outputs"
# The only time-dependent content coremltools writes.
_CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


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


def iter_tensors(
    checkpoint: Checkpoint, names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The range's tensors, one at a time, in order: the one place export reads weights.

    The consumer quantizes each and drops it (a few in flight), so memory never holds a
    layer range in bf16 or fp32.
    """
    for name in names:
        yield name, checkpoint.read_tensors([name])[name]


def program_op_counts(prog: Any, function: str | None = None) -> Counter[str]:
    """Op types in one function (default: the program's default one), nested blocks included."""
    counts: Counter[str] = Counter()

    def walk(ops: Any) -> None:
        for op in ops:
            counts[op.op_type] += 1
            for block in getattr(op, "blocks", ()):
                walk(block.operations)

    walk(prog.functions[function or prog.default_function_name].operations)
    return counts


class _Stages:
    """Per-stage wall time, reported as progress."""

    def __init__(self, label: str, say: Progress, t0: float) -> None:
        self.label, self.say, self.t0 = label, say, t0
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.t
        self.say(f"{self.label} {name} done in {now - self.t:.1f}s")
        self.t = now


def _metadata(
    checkpoint: Checkpoint,
    kind: str,
    layers: LayerRange | None,
    weights_fingerprint: str,
    contract: IOContract,
    settings: ExportSettings,
    extra: dict[str, str],
    functions: dict[str, int] | None = None,
) -> ShardMetadata:
    rope = RopeParameters.from_hf_config(checkpoint.hf_config)
    return ShardMetadata(
        version=__version__,
        kind=kind,
        layers=layers,
        num_hidden_layers=checkpoint.architecture.num_hidden_layers,
        checkpoint_fingerprint=checkpoint.fingerprint,
        weights_fingerprint=weights_fingerprint,
        quantization=settings.quantization,
        context_length=settings.context_length,
        architecture=checkpoint.architecture,
        contract=contract,
        # LongRoPE frequencies and scaling, so a runtime can build cos/sin without the checkpoint.
        extra={**extra, "rope": json.dumps(rope.to_dict(), sort_keys=True)},
        functions=functions or dict(DECODE_ONLY),
    )


def _finish_package(package: Path, meta: ShardMetadata, description: str) -> None:
    """Write the metadata into a saved package's spec, and make the package reproducible.

    Two parts of a saved package vary between identical saves: coremltools' ModelPackage
    names each item with a fresh UUID4 (Manifest.json), and protobuf serializes map fields
    (the user metadata) in hash order; coremltools also stamps the conversion date. The
    spec is re-serialized deterministically without the date, and item identifiers are
    derived from the item paths; the weight blob is already a function of the program.
    """
    from coremltools.proto import Model_pb2

    spec_path = package / "Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    metadata = spec.description.metadata
    if _CONVERSION_DATE_KEY in metadata.userDefined:
        del metadata.userDefined[_CONVERSION_DATE_KEY]
    metadata.userDefined.update(meta.to_user_metadata())
    metadata.shortDescription = description
    metadata.versionString = __version__
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, "anechain:" + entry["path"])).upper()
        for old, entry in manifest["itemInfoEntries"].items()
    }
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _check_program(
    mlmodel: Any,
    expected_conv: int,
    settings: ExportSettings,
    label: str,
    functions: tuple[str | None, ...] = (None,),
) -> Counter[str]:
    """Op counts of each function of the converted program (None: the default one); an
    ExportError if they are not a shard's. Returns the first function's counts."""
    first: Counter[str] | None = None
    for function in functions:
        counts = program_op_counts(mlmodel._mil_program, function)
        where = f" ({function})" if function else ""
        if counts["conv"] != expected_conv or counts["linear"]:
            raise ExportError(
                f"{label} unexpected program{where}: {counts['conv']} conv ops (want "
                f"{expected_conv}), {counts['linear']} linear"
            )
        quantized = counts["constexpr_blockwise_shift_scale"]
        if settings.quantization == "int8" and quantized != expected_conv:
            raise ExportError(
                f"{label} {quantized} INT8 weights in the program{where}, want {expected_conv}"
            )
        first = first if first is not None else counts
    assert first is not None
    return first


def _save(
    write: Callable[[Path], Any],
    meta: ShardMetadata,
    description: str,
    dest: Path,
    expected_conv: int,
    settings: ExportSettings,
    overwrite: bool,
    stages: _Stages,
    t0: float,
    write_stage: str = "convert",
) -> ExportResult:
    """`write(tmp)` saves a package at tmp and returns its MLModel; check it, finish it,
    rename it into place (atomic: an error or interrupt leaves nothing at dest)."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        mlmodel = write(tmp)
        stages.done(write_stage)
        functions = tuple(meta.functions) if meta.kind == KIND_LAYERS else (None,)
        counts = _check_program(mlmodel, expected_conv, settings, stages.label, functions)
        del mlmodel
        _finish_package(tmp, meta, description)
    stages.done("save")
    return ExportResult(
        path=dest,
        layers=meta.layers,
        op_counts=dict(counts),
        quantized_weights=counts["constexpr_blockwise_shift_scale"],
        size_bytes=package_size(dest),
        seconds=time.perf_counter() - t0,
        stage_seconds=stages.seconds,
        kind=meta.kind,
    )


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.suffix != ".mlpackage":
        raise ExportError(f"{dest}: the output must end in .mlpackage")
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it")


def program_bytes(prog: Any) -> int:
    """The bytes of the program's constants (weights shared between functions once): a
    lower bound of the saved package's size (its spec holds more)."""
    seen: dict[int, int] = {}

    def walk(ops: Any) -> None:
        for op in ops:
            if op.op_type == "const" and op.outputs and op.outputs[0].val is not None:
                val = op.outputs[0].val
                seen.setdefault(id(val), int(getattr(val, "nbytes", 8)))
            for block in getattr(op, "blocks", ()):
                walk(block.operations)

    for function in prog.functions.values():
        walk(function.operations)
    return sum(seen.values())


def _release(exc: BaseException) -> None:
    """Free what the frames of `exc` (and what it chains) hold, now: coremltools' temporary
    spec file (a NamedTemporaryFile) unlinks itself when freed, and freed after its work
    folder is gone it prints a FileNotFoundError "ignored" traceback on stderr."""
    seen: BaseException | None = exc
    while seen is not None:
        traceback.clear_frames(seen.__traceback__)
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    gc.collect()


def _converter(prog: Any, label: str, dest: Path) -> Callable[[Path], Any]:
    """Convert the built program straight into the package folder (no second copy).

    A full disk during the conversion is named with the space it needs at least:
    coremltools writes the weights and the spec to temporary files first (tempfile: the
    work folder beside dest), then copies them into the package, so twice the weights
    and more at the peak."""
    from anechain.fsutil import filled_by
    from anechain.program import to_mlmodel

    need = 2 * program_bytes(prog)

    def write(package: Path) -> Any:
        try:
            return to_mlmodel(prog, package)
        except Exception as exc:  # coremltools raises assorted types for an invalid program
            # Measured first, while coremltools' partial files still fill the disk.
            failure = filled_by(exc, dest, need, package.parent, at_least=True) or ExportError(
                f"{label} conversion failed: {exc}"
            )
            _release(exc)
        raise failure  # outside `except`: it must not keep `exc` alive as its context

    return write


def _layers_description(layers: LayerRange, settings: ExportSettings) -> str:
    t = settings.prefill_tokens
    return (
        f"Phi-4-mini decoder layers [{layers.start}, {layers.end}) for single-token decode"
        + (f" and {t}-token prefill" if t else "")
        + f", {settings.quantization} weights, KV cache as state"
    )


def _head_description(n_chunks: int, settings: ExportSettings) -> str:
    return (
        f"Phi-4-mini final norm + LM head in {n_chunks} chunks of <= "
        f"{settings.head_chunk_rows} rows, each returning its max logit and argmax"
    )


@isolated_tempdir("spec")
def export_shard(
    checkpoint: Checkpoint,
    spec: LayerSpec,
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export one layer range to one .mlpackage, atomically."""
    from anechain.program import layer_functions_program, layer_program
    from anechain.weights import read_range_weights

    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    layers = spec.layers
    layers.check_within(arch.num_hidden_layers)
    checkpoint.check_layers(layers, settings.context_length)
    _check_dest(spec.path, overwrite)

    t0 = time.perf_counter()
    label = f"[{layers}]"
    contract = layer_contract(arch, settings.context_length, layers.num_layers)
    say(f"{label} reading and quantizing {layers.num_layers} layers from {checkpoint.path}")
    names = checkpoint.layer_tensor_names(layers)
    stages = _Stages(label, say, t0)
    with ThreadPoolExecutor(1) as pool:
        # sha256 of the range's bytes (the metadata fingerprint) on a thread meanwhile.
        fingerprint = pool.submit(checkpoint.weights_fingerprint, names)
        weights = read_range_weights(iter_tensors(checkpoint, names), layers, settings.quantization)
        weights_fingerprint = fingerprint.result()
    stages.done("read+quantize")
    functions = function_names(settings.prefill_tokens)
    if settings.prefill_tokens:  # decode + prefill from the same quantized weights
        prog, outputs = layer_functions_program(
            arch, settings.context_length, weights, settings.prefill_tokens
        )
    else:
        prog, outputs = layer_program(contract, weights, arch, settings.context_length)
    del weights
    stages.done("build")
    meta = _metadata(
        checkpoint,
        KIND_LAYERS,
        layers,
        weights_fingerprint,
        contract,
        settings,
        {LAYER_OUTPUTS_KEY: json.dumps(outputs)},
        functions,
    )
    return _save(
        _converter(prog, label, spec.path),
        meta,
        _layers_description(layers, settings),
        spec.path,
        4 * layers.num_layers,
        settings,
        overwrite,
        stages,
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
    """Export the final RMSNorm + chunked LM head (INT8 like the layers), chunk by chunk."""
    from anechain.program import head_program
    from anechain.weights import read_head_weights

    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    checkpoint.check_tensors(head_tensor_names(checkpoint))
    _check_dest(dest, overwrite)
    t0 = time.perf_counter()
    label = "[head]"
    say(f"{label} reading the final norm and LM head from {checkpoint.path}")
    names = list(head_tensor_names(checkpoint))
    stages = _Stages(label, say, t0)
    with ThreadPoolExecutor(1) as pool:
        fingerprint = pool.submit(checkpoint.weights_fingerprint, names)
        weights = read_head_weights(
            checkpoint, names, settings.head_chunk_rows, settings.quantization
        )
        weights_fingerprint = fingerprint.result()
    stages.done("read+quantize")
    n_chunks = len(weights.chunks)
    contract = head_contract(arch, n_chunks)
    prog = head_program(contract, weights, arch)
    del weights
    stages.done("build")
    meta = _metadata(
        checkpoint,
        KIND_HEAD,
        None,
        weights_fingerprint,
        contract,
        settings,
        {"head_chunk_rows": str(settings.head_chunk_rows)},
    )
    return _save(
        _converter(prog, label, dest),
        meta,
        _head_description(n_chunks, settings),
        dest,
        n_chunks,
        settings,
        overwrite,
        stages,
        t0,
    )


def export_embedding(
    checkpoint: Checkpoint,
    dest: Path,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """The token embedding as an fp16 .npy table the host gathers rows from (mmap-able).

    Phi-4-mini ties it with the LM head; the head package holds its own INT8 copy. Written
    in row blocks, so memory holds one block, not the 200064 x 3072 table.
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
    rows, cols = checkpoint.tensor_shape(name)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
        "fortran_order": False,
        "shape": (rows, cols),
    }
    with (
        atomic_path(dest, overwrite=overwrite, expected_bytes=rows * cols * 2) as tmp,
        open(tmp, "wb") as f,
    ):
        # Plain writes, not a memmap: written pages of a mapping would count as our memory.
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, rows, 16384):
            block = checkpoint.read_rows(name, start, min(start + 16384, rows))
            f.write(block.to(torch.float16).numpy().tobytes())
    say(f"[embedding] {rows} x {cols} fp16 written")
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

    Every spec is checked before the first export starts.
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
