"""Checkpoint tensors -> the weight constants of a shard program, streamed.

Each projection is read, quantized to INT8 (`quantize_int8`: bit for bit what coremltools'
`linear_quantize_weights(linear_symmetric, int8, per_channel)` stores) and its bf16 tensor
dropped; two tensors are quantized at a time on worker threads while the next one is read,
so memory holds at most three bf16 tensors and the INT8 results, never a float layer range.
The head's 200064 x 3072 matrix is read and quantized in its vocabulary chunks.

`Weight`, `LayerWeights` and `HeadWeights` hold numpy arrays only; `anechain.program` emits
them into as many functions as needed (a decode and a prefill function share each blob).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from coremltools.converters.mil import Builder as mb

from anechain.config import LayerRange
from anechain.errors import ExportError

T = TypeVar("T")
R = TypeVar("R")

# Row block for quantization: small enough for the CPU caches (a few MB of temporaries).
_QUANT_ROWS = 256
# coremltools' linear_symmetric INT8 range.
_QMAX = 127


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """torch on one thread: its elementwise ops over small blocks are memory-bound, and on
    a shared 2-core machine two OpenMP threads waiting on each other were 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class QuantizedWeight:
    """Per-output-channel symmetric INT8: weight ~= data * scale."""

    data: np.ndarray  # int8 (out, in, 1, 1)
    scale: np.ndarray  # fp16 (out, 1, 1, 1)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """INT8 data and fp16 scales exactly as coremltools' per-channel linear_symmetric INT8.

    coremltools quantizes the program's fp16 constant in numpy fp16 arithmetic
    (optimize/_utils.py `quantize_weight_by_dtype`): scale = (max|w| - (-max|w|)) / 254 and
    data = clip(round(w / scale), -127, 127), every operation rounded to fp16. Each fp16
    operation here is computed in fp32 and rounded to fp16, which is the correctly rounded
    fp16 result (fp32 carries more than 2 x 11 + 2 bits), so the two agree bit for bit
    (tests/test_program.py checks it against coremltools itself).

    Two cases coremltools has no fp16 answer for: an all-zero row (scale 0) gets data 0
    instead of NaN cast to int8; a row block beyond fp16's range (which the converter would keep in
    fp32) is quantized in fp32 arithmetic, its scale then rounded to fp16.
    """
    w = weight.reshape(weight.shape[0], -1)  # (out, in)
    out_rows, cols = w.shape
    data = np.empty((out_rows, cols), dtype=np.int8)
    scale = np.empty((out_rows, 1), dtype=np.float16)
    data_t, scale_t = torch.from_numpy(data), torch.from_numpy(scale)
    with torch.inference_mode():
        for r in range(0, out_rows, _QUANT_ROWS):
            block = w[r : r + _QUANT_ROWS]
            w16 = block.to(torch.float16)
            amax = w16.abs().amax(dim=1, keepdim=True)  # exact in fp16
            if torch.isfinite(amax).all():
                span = (amax.float() * 2).half()  # max - (-max), in fp16
                s = (span.float() / (2 * _QMAX)).half()
                # fp16(w / s); an all-zero row divides by 1 (0, not 0/0 = NaN)
                q = w16.float().div_(s.float().masked_fill_(amax == 0, 1.0)).half()
            else:
                w32 = block.to(torch.float32, copy=True)
                if not torch.isfinite(w32).all():
                    raise ExportError("a projection weight holds inf or NaN")
                s = (w32.abs().amax(dim=1, keepdim=True) * 2 / (2 * _QMAX)).half()
                q = w32.div_(s.float().masked_fill_(s == 0, 1.0))
            data_t[r : r + _QUANT_ROWS] = q.round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
            scale_t[r : r + _QUANT_ROWS] = s
    return QuantizedWeight(data.reshape(out_rows, cols, 1, 1), scale.reshape(out_rows, 1, 1, 1))


@dataclass(frozen=True)
class Weight:
    """One conv weight (out, in, 1, 1): INT8 + scales, or fp16; `name` is its var name."""

    name: str
    quantized: QuantizedWeight | None = None
    fp16: np.ndarray | None = None

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor, quantization: str) -> Weight:
        """(out, in) checkpoint tensor -> conv weight (out, in, 1, 1)."""
        if quantization == "int8":
            return cls(name, quantized=quantize_int8(tensor))
        w = tensor.to(torch.float16).numpy()
        return cls(name, fp16=w.reshape(*w.shape, 1, 1))

    @property
    def out_channels(self) -> int:
        arr = self.quantized.data if self.quantized is not None else self.fp16
        assert arr is not None
        return int(arr.shape[0])

    @property
    def nbytes(self) -> int:
        if self.quantized is not None:
            return self.quantized.data.nbytes + self.quantized.scale.nbytes
        assert self.fp16 is not None
        return self.fp16.nbytes

    def emit(self) -> Any:
        """The weight var in the function being built (consts named and shared by name)."""
        if self.quantized is None:
            return emit_const(self.fp16.view(_FlatView), self.name)
        data = emit_const(self.quantized.data.view(_FlatView), self.name + "_data")
        scale = emit_const(self.quantized.scale, self.name + "_scale")
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name=self.name)


class _FlatView(np.ndarray):
    """A weight array whose `flatten()` is a view, not a copy.

    coremltools' weight writer calls `val.flatten()` on every constant before writing its
    bytes (backend/mil/helper.py): a full copy, ~800 MB per 8-layer shard. The bytes
    written are the same; only the copy is saved.
    """

    def flatten(self, order: Any = "C") -> np.ndarray:
        base = np.asarray(self)
        if order == "C" and base.flags.c_contiguous:
            return base.reshape(-1)
        return base.flatten(order)


def emit_const(val: Any, name: str) -> Any:
    """A named const whose blob is shared by every function that emits it (`weight_id`)."""
    var = mb.const(val=val, name=name)
    var.op.weight_id = name
    return var


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights; `prefix` is `layers_{k}_` with k shard-relative."""

    prefix: str
    input_layernorm: np.ndarray  # fp16 (1, C, 1, 1)
    qkv_proj: Weight
    o_proj: Weight
    post_attention_layernorm: np.ndarray
    gate_up_proj: Weight
    down_proj: Weight

    def projections(self) -> tuple[Weight, ...]:
        return (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)

    def gains(self) -> tuple[np.ndarray, ...]:
        return (self.input_layernorm, self.post_attention_layernorm)


def _gain(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float16).numpy().reshape(1, -1, 1, 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 2) -> Iterator[R]:
    """fn over items on `workers` threads, results in order, at most workers + 1 in flight.

    torch runs single-threaded meanwhile: the elementwise ops over small blocks are
    memory-bound, and on a shared 2-core machine two OpenMP threads waiting on each other
    were 5-20x slower than one; the parallelism is across tensors instead.
    """
    with _single_thread(), ThreadPoolExecutor(workers) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            del item  # the job holds the tensor; nothing else does
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def layer_var_name(hf_name: str, start: int) -> str:
    """`model.layers.9.mlp.down_proj.weight`, shard from 8 -> `layers_1_mlp_down_proj_weight`."""
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise ExportError(f"{hf_name} is not a decoder-layer tensor")
    return "_".join(["layers", str(int(parts[2]) - start), *parts[3:]])


def read_range_weights(
    tensors: Iterable[tuple[str, torch.Tensor]], layers: LayerRange, quantization: str
) -> list[LayerWeights]:
    """A layer range's weights from its tensors (`model.hf_layer_tensor_names` order)."""
    from anechain.model import hf_layer_tensor_names

    def prepare(item: tuple[str, torch.Tensor]) -> tuple[str, Any]:
        name, tensor = item
        if tensor.ndim == 1:  # RMSNorm gain
            return name, _gain(tensor)
        return name, Weight.from_tensor(layer_var_name(name, layers.start), tensor, quantization)

    prepared = dict(ordered_map(prepare, tensors))
    out = []
    for offset, index in enumerate(range(layers.start, layers.end)):
        names = hf_layer_tensor_names(index)
        missing = [n for n in names if n not in prepared]
        if missing:  # internal invariant: the caller iterates the range's names
            raise ExportError(f"{missing[0]} was not read")
        norm_in, qkv, o, norm_post, gate_up, down = (prepared.pop(n) for n in names)
        out.append(LayerWeights(f"layers_{offset}_", norm_in, qkv, o, norm_post, gate_up, down))
    return out


@dataclass(frozen=True)
class HeadWeights:
    norm: np.ndarray  # fp16 (1, C, 1, 1)
    chunks: tuple[Weight, ...]  # (rows_i, C, 1, 1), rows_i <= chunk_rows


def read_head_weights(
    checkpoint: Any, names: list[str], chunk_rows: int, quantization: str
) -> HeadWeights:
    """Final norm + the LM head in vocabulary chunks, read and quantized chunk by chunk.

    Per-output-channel scales make each chunk's quantization independent of the others,
    so it equals quantizing the whole matrix; only a few chunks of bf16 rows are in memory.
    """
    norm_name, head_name = names
    norm = _gain(checkpoint.read_tensors([norm_name])[norm_name])
    vocab = checkpoint.tensor_shape(head_name)[0]

    def prepare(n: int) -> Weight:
        start = n * chunk_rows
        rows = checkpoint.read_rows(head_name, start, min(start + chunk_rows, vocab))
        return Weight.from_tensor(f"chunks_{n}_weight", rows, quantization)

    n_chunks = -(-vocab // chunk_rows)
    return HeadWeights(norm, tuple(ordered_map(prepare, range(n_chunks))))
