"""A Hugging Face checkpoint folder: config.json + (sharded) safetensors, read lazily.

Exporting [24, 32) reads only those layers' tensors: never the other layers, never the
200064 x 3072 embedding. Tensors are located through the index file (or the safetensors
headers) and read one at a time with safetensors' `safe_open`. No hub access, ever.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from anechain.checkpoint_files import CONFIG_NAME, INDEX_NAME
from anechain.config import Architecture, LayerRange
from anechain.errors import CheckpointError, ConfigError
from anechain.fsutil import human_size
from anechain.jsonio import loads_json

# Bytes sampled per tensor for the checkpoint fingerprint: cheap, yet different weights
# (another seed, an altered layer) give a different fingerprint.
_SAMPLE_CHUNKS, _SAMPLE_CHUNK_BYTES = 8, 4096
# safetensors dtypes a weight may have (Phi-4-mini ships bf16), with their sizes.
_FLOAT_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
# config.json fields the architecture is built from: integers, all positive.
_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class _TensorLocation:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (bad header size)")
        try:
            header = loads_json(f.read(size))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)")
    header["__data_start__"] = 8 + size
    return header


class Checkpoint:
    """A checkpoint folder. Cheap to open: only config.json and tensor headers are read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.path} has no {CONFIG_NAME}; expected a Hugging Face folder"
            )
        self.config_bytes = config_path.read_bytes()
        try:
            raw = loads_json(self.config_bytes)
        except ValueError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_path} is not a JSON object")
        if raw.get("model_type") != "phi3":
            raise CheckpointError(
                f"{config_path}: model_type is {raw.get('model_type')!r}; anechain supports "
                "Phi-4-mini (model_type 'phi3')"
            )
        self.raw_config = raw
        _check_raw_config(raw, config_path)

    @cached_property
    def hf_config(self) -> Any:
        """transformers' own Phi3Config for this folder (local files only)."""
        from transformers import Phi3Config

        try:
            return Phi3Config.from_pretrained(str(self.path), local_files_only=True)
        except Exception as exc:  # transformers raises several types for bad configs
            # Its validators print a field per line: one line for the user.
            detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise CheckpointError(f"{self.path / CONFIG_NAME}: {detail}") from None

    @cached_property
    def architecture(self) -> Architecture:
        try:
            return self._architecture()
        except ConfigError as exc:
            msg = str(exc).removeprefix("architecture.")
            raise CheckpointError(f"{self.path / CONFIG_NAME}: {msg}") from None

    def _architecture(self) -> Architecture:
        c = self.hf_config
        rope = getattr(c, "rope_parameters", None) or {}
        return Architecture(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            vocab_size=c.vocab_size,
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
            ),
            max_position_embeddings=c.max_position_embeddings,
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings")
                or getattr(c, "original_max_position_embeddings", c.max_position_embeddings)
            ),
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            rms_norm_eps=float(c.rms_norm_eps),
            tie_word_embeddings=bool(c.tie_word_embeddings),
        )

    @cached_property
    def _locations(self) -> dict[str, _TensorLocation]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = loads_json(index.read_bytes())["weight_map"]
                files = sorted({self.path / f for f in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index} is not a valid safetensors index") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{self.path} has no *.safetensors files")
        locations: dict[str, _TensorLocation] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file.name} is listed in {INDEX_NAME} but missing")
            header = _read_safetensors_header(file)
            start = header.pop("__data_start__")
            header.pop("__metadata__", None)
            size = file.stat().st_size
            for name, info in header.items():
                try:
                    b, e = (int(x) for x in info["data_offsets"])
                    dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{file}: malformed header entry for {name}") from None
                if not 0 <= b <= e or start + e > size:
                    raise CheckpointError(f"{file} is truncated: {name} runs past its end")
                locations[name] = _TensorLocation(file, dtype, shape, start + b, start + e)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(locations))
            if missing:
                raise CheckpointError(f"{missing[0]} is in {INDEX_NAME} but in no file")
        return locations

    def tensor_names(self) -> list[str]:
        return sorted(self._locations)

    def _location(self, name: str) -> _TensorLocation:
        try:
            return self._locations[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """The shape the architecture (config.json) gives tensor `name`."""
        a = self.architecture
        h, d = a.hidden_size, a.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (a.vocab_size, h)
        if name == "model.norm.weight":
            return (h,)
        by_suffix = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.qkv_proj.weight": (
                (a.num_attention_heads + 2 * a.num_key_value_heads) * d,
                h,
            ),
            "self_attn.o_proj.weight": (h, a.num_attention_heads * d),
            "mlp.gate_up_proj.weight": (2 * a.intermediate_size, h),
            "mlp.down_proj.weight": (h, a.intermediate_size),
        }
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in by_suffix:
            return by_suffix[parts[3]]
        raise CheckpointError(f"{name} is not a tensor of the Phi-4-mini architecture")

    def check_tensors(self, names: Iterable[str]) -> None:
        """Every tensor's shape and dtype against the architecture, from the headers only.

        A row missing, or a matrix transposed (same element count), would otherwise be
        reshaped into place and exported without complaint.
        """
        for name in names:
            loc = self._location(name)
            expected = self.expected_shape(name)
            if loc.shape != expected:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has shape {list(loc.shape)}, expected "
                    f"{list(expected)} from {CONFIG_NAME}"
                )
            if loc.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has dtype {loc.dtype}, expected one of "
                    f"{', '.join(_FLOAT_DTYPES)}"
                )
            if loc.end - loc.begin != math.prod(loc.shape) * _FLOAT_DTYPES[loc.dtype]:
                raise CheckpointError(
                    f"{self.path}: tensor {name} holds {loc.end - loc.begin} bytes, not the "
                    f"{math.prod(loc.shape) * _FLOAT_DTYPES[loc.dtype]} its shape needs"
                )

    def check_layers(self, layers: LayerRange, context_length: int | None = None) -> None:
        """Before exporting [start, end): its tensors' shapes and dtypes, and, given a
        context length, that the model supports it and its KV cache fits in memory."""
        self.check_tensors(self.layer_tensor_names(layers))
        if context_length is None:
            return
        a = self.architecture
        if context_length > a.max_position_embeddings:
            raise CheckpointError(
                f"context {context_length} is beyond the model's max_position_embeddings "
                f"({a.max_position_embeddings})"
            )
        # Key and value states, fp16, as validation's runner and the device allocate them:
        # (layers, kv_heads, context, head_dim) each.
        need = 2 * layers.num_layers * a.num_key_value_heads * context_length * a.head_dim * 2
        free = available_memory()
        if free is not None and need > free:
            raise CheckpointError(
                f"context {context_length} needs {human_size(need)} of KV cache for "
                f"{layers.num_layers} layers; {human_size(free)} of memory is available "
                "(use a smaller context or fewer layers per shard)"
            )

    def check_reference(self, upto: int) -> None:
        """`check_tensors` for what the golden reference reads: the embedding, layers < upto."""
        from anechain.model import hf_layer_tensor_names

        self.check_tensors(
            [
                "model.embed_tokens.weight",
                *(n for i in range(upto) for n in hf_layer_tensor_names(i)),
            ]
        )

    @staticmethod
    def check_finite(name: str, tensor: torch.Tensor) -> None:
        """Refuse a tensor holding NaN or Inf, naming it (as it is read: one cheap pass)."""
        if tensor.numel() == 0 or not tensor.is_floating_point():
            return
        # aminmax propagates NaN and shows +-Inf; ~20x faster than isfinite().all() on bf16.
        lo, hi = torch.aminmax(tensor)
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            return
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        found = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
        raise CheckpointError(
            f"tensor {name} holds non-finite values ({found}); the weights are corrupt"
        )

    def read_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load just these tensors (in their stored dtype); a NaN or Inf in one is an error."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._location(name).file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name)
            except Exception as exc:  # SafetensorError has no importable base class
                raise CheckpointError(f"{file} cannot be read: {exc}") from None
            for name in file_names:
                self.check_finite(name, out[name])
        return out

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the safetensors header (no data read)."""
        return self._location(name).shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, reading only their bytes (large matrices in blocks)."""
        from safetensors import safe_open

        file = self._location(name).file
        try:
            with safe_open(str(file), framework="pt") as f:
                rows = f.get_slice(name)[start:stop]
        except Exception as exc:  # SafetensorError has no importable base class
            raise CheckpointError(f"{file} cannot be read: {exc}") from None
        self.check_finite(name, rows)
        return rows

    def layer_tensor_names(self, layers: LayerRange) -> list[str]:
        from anechain.model import hf_layer_tensor_names

        layers.check_within(self.architecture.num_hidden_layers)
        return [n for i in range(layers.start, layers.end) for n in hf_layer_tensor_names(i)]

    def layer_tensor_names_for(self, layer_index: int) -> list[str]:
        return self.layer_tensor_names(LayerRange(layer_index, layer_index + 1))

    def _hash_bytes(self, h: Any, loc: _TensorLocation, sample: bool) -> None:
        size = loc.end - loc.begin
        with open(loc.file, "rb") as f:
            if not sample or size <= _SAMPLE_CHUNKS * _SAMPLE_CHUNK_BYTES:
                f.seek(loc.begin)
                remaining = size
                while remaining:
                    block = f.read(min(remaining, 1 << 22))
                    if not block:
                        raise CheckpointError(f"{loc.file.name} is truncated")
                    h.update(block)
                    remaining -= len(block)
                return
            stride = (size - _SAMPLE_CHUNK_BYTES) // (_SAMPLE_CHUNKS - 1)
            for i in range(_SAMPLE_CHUNKS):
                f.seek(loc.begin + i * stride)
                h.update(f.read(_SAMPLE_CHUNK_BYTES))

    def weights_fingerprint(self, names: Iterable[str]) -> str:
        """sha256 over the full bytes of these tensors (names, dtypes, shapes included)."""
        h = hashlib.sha256()
        for name in sorted(names):
            loc = self._location(name)
            h.update(f"{name}|{loc.dtype}|{loc.shape}\n".encode())
            self._hash_bytes(h, loc, sample=False)
        return h.hexdigest()

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the whole checkpoint: config plus sampled bytes of every tensor."""
        h = hashlib.sha256()
        h.update(json.dumps(self.raw_config, sort_keys=True).encode())
        for name in self.tensor_names():
            loc = self._locations[name]
            h.update(f"{name}|{loc.dtype}|{loc.shape}\n".encode())
            self._hash_bytes(h, loc, sample=True)
        return h.hexdigest()


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get (Linux: MemAvailable; else physical)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_raw_config(raw: dict[str, Any], config_path: Path) -> None:
    """The architecture fields of config.json, one line naming the first bad one.

    transformers' own validators would report these as multi-line dumps, or not at all.
    """
    for name in _INT_FIELDS:
        if name not in raw and name == "num_key_value_heads":
            continue  # Phi3Config defaults it to num_attention_heads
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(
                f"{config_path}: {name} must be a positive integer, got {value!r}"
            )
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads", heads)
    if raw["hidden_size"] % heads:
        raise CheckpointError(
            f"{config_path}: hidden_size {raw['hidden_size']} is not a multiple of "
            f"num_attention_heads {heads}"
        )
    if heads % kv_heads:
        raise CheckpointError(
            f"{config_path}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder (tests alter copies, never the original)."""
    shutil.copytree(src, dst)
    return Path(dst)


# Random checkpoints live in their own module; their public names stay importable from here.
from anechain.random_checkpoint import (  # noqa: E402
    MASSIVE_LAYER,
    MASSIVE_VALUE,
    QK_GAIN,
    STATS_NAME,
    STYLES,
    bos_token_id,
    hf_config_dict,
    massive_channels,
    random_checkpoint_stats,
    write_random_checkpoint,
)

__all__ = [
    "MASSIVE_LAYER",
    "MASSIVE_VALUE",
    "QK_GAIN",
    "STATS_NAME",
    "STYLES",
    "Checkpoint",
    "available_memory",
    "bos_token_id",
    "copy_checkpoint",
    "hf_config_dict",
    "massive_channels",
    "random_checkpoint_stats",
    "write_random_checkpoint",
]
