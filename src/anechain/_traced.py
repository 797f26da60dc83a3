"""The traced export path: torch.jit.trace -> ct.convert (states) -> INT8 pass -> package.

Private. This is the executable specification of the programs `anechain.program` builds
directly: tests/test_program_equivalence.py exports the same range both ways and requires
the same ops, INT8 data, scales and fp16 outputs, and scripts/bench_export.py times both.
Users export through `anechain.export` only.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anechain.checkpoint import Checkpoint
from anechain.config import ExportSettings
from anechain.contract import KIND_HEAD, KIND_LAYERS, IOContract, head_contract, layer_contract
from anechain.errors import ExportError
from anechain.export import (
    LAYER_OUTPUTS_KEY,
    ExportResult,
    LayerSpec,
    Progress,
    _check_dest,
    _head_description,
    _layers_description,
    _metadata,
    _save,
    _Stages,
    log,
)
from anechain.head import head_tensor_names
from anechain.model import LayerRangeModel, LMHeadModel


def _example_inputs(contract: IOContract) -> tuple[torch.Tensor, ...]:
    # fp32 example inputs: the module is traced in fp32 and converted with fp16 compute.
    out = []
    for spec in contract.inputs:
        dtype = torch.int32 if spec.dtype == "int32" else torch.float32
        out.append(torch.zeros(spec.shape, dtype=dtype))
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


def _trace_convert(
    module: torch.nn.Module, contract: IOContract, settings: ExportSettings, stages: _Stages
) -> Any:
    label = stages.label
    with torch.no_grad():
        traced = torch.jit.trace(module, _example_inputs(contract), check_trace=False)
    stages.done("trace")
    try:
        mlmodel = _convert(traced, contract)
    except Exception as exc:
        raise ExportError(f"{label} conversion failed: {exc}") from exc
    del traced
    gc.collect()
    stages.done("convert")
    if settings.quantization == "int8":
        try:
            mlmodel = _quantize_int8(mlmodel)
        except Exception as exc:
            raise ExportError(f"{label} INT8 quantization failed: {exc}") from exc
        gc.collect()
        stages.done("quantize")
    return mlmodel


def _saver(mlmodel: Any) -> Any:
    def write(package: Path) -> Any:
        mlmodel.save(str(package))
        return mlmodel

    return write


def _layer_output_names(mlmodel: Any, num_layers: int) -> list[str]:
    """Each layer's output var in the traced program: the adds of the residual stream.

    Layer k ends with the second residual add that follows its k-th `down_proj` conv.
    """
    ops = list(mlmodel._mil_program.functions["main"].operations)
    names, convs = [], 0
    for op in ops:
        if op.op_type == "conv":
            convs += 1
        elif op.op_type == "add" and convs and convs % 4 == 0 and len(names) < convs // 4:
            names.append(op.outputs[0].name)
    if len(names) != num_layers:
        raise ExportError(f"found {len(names)} layer outputs in the traced program")
    return names


def export_shard_traced(
    checkpoint: Checkpoint,
    spec: LayerSpec,
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """The traced export of one layer range (same checks, metadata and saving as export)."""
    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    layers = spec.layers
    layers.check_within(arch.num_hidden_layers)
    _check_dest(spec.path, overwrite)
    t0 = time.perf_counter()
    contract = layer_contract(arch, settings.context_length, layers.num_layers)
    names = checkpoint.layer_tensor_names(layers)
    stages = _Stages(f"[{layers}]", say, t0)
    model = LayerRangeModel(arch, layers, settings.context_length).eval()
    model.load_hf_layer_weights(checkpoint.read_tensors(names))
    stages.done("load")
    mlmodel = _trace_convert(model, contract, settings, stages)
    del model
    outputs = _layer_output_names(mlmodel, layers.num_layers)
    meta = _metadata(
        checkpoint,
        KIND_LAYERS,
        layers,
        checkpoint.weights_fingerprint(names),
        contract,
        settings,
        {LAYER_OUTPUTS_KEY: json.dumps(outputs)},
    )
    return _save(
        _saver(mlmodel),
        meta,
        _layers_description(layers, settings),
        spec.path,
        4 * layers.num_layers,
        settings,
        overwrite,
        stages,
        t0,
        write_stage="write",
    )


def export_head_traced(
    checkpoint: Checkpoint,
    dest: Path,
    settings: ExportSettings,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    say = progress or (lambda msg: log.info(msg))
    arch = checkpoint.architecture
    _check_dest(dest, overwrite)
    t0 = time.perf_counter()
    names = list(head_tensor_names(checkpoint))
    stages = _Stages("[head]", say, t0)
    tensors = checkpoint.read_tensors(names)
    model = LMHeadModel(arch, settings.head_chunk_rows).eval()
    model.load_hf_weights(tensors[names[0]], tensors[names[1]])
    del tensors
    stages.done("load")
    n_chunks = len(model.chunks)
    contract = head_contract(arch, n_chunks)
    mlmodel = _trace_convert(model, contract, settings, stages)
    del model
    meta = _metadata(
        checkpoint,
        KIND_HEAD,
        None,
        checkpoint.weights_fingerprint(names),
        contract,
        settings,
        {"head_chunk_rows": str(settings.head_chunk_rows)},
    )
    return _save(
        _saver(mlmodel),
        meta,
        _head_description(n_chunks, settings),
        dest,
        n_chunks,
        settings,
        overwrite,
        stages,
        t0,
        write_stage="write",
    )
