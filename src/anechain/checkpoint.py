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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from anechain.checkpoint_files import (
    CONFIG_NAME,
    INDEX_NAME,
    phi3_weight_bytes,
    save_sharded,
    write_config,
)
from anechain.config import Architecture, LayerRange
from anechain.errors import CheckpointError, ConfigError
from anechain.fsutil import atomic_path, human_size
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


# --- random checkpoints -------------------------------------------------------------------


def hf_config_dict(arch: Architecture) -> dict[str, Any]:
    """A config.json with the Phi-3 family's keys for `arch` (LongRoPE factors made up).

    As the real files: LongRoPE (`rope_scaling` type "longrope") only when the model runs
    past its original window, else `rope_scaling` null (Phi-3-mini-4k); no
    `partial_rotary_factor` key for full rotary (Phi-3's configs have none: 1.0).
    """
    half = arch.rotary_dim // 2
    # Plausible LongRoPE factors: short near 1, long rising towards the interpolation factor.
    short = [round(1.0 + 0.05 * i / max(half - 1, 1), 6) for i in range(half)]
    long = [round(1.0 + 30.0 * (i / max(half - 1, 1)) ** 2, 6) for i in range(half)]
    longrope = arch.max_position_embeddings > arch.original_max_position_embeddings
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id(arch),
        "eos_token_id": arch.vocab_size - 1,
        "pad_token_id": arch.vocab_size - 1,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "original_max_position_embeddings": arch.original_max_position_embeddings,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_key_value_heads": arch.num_key_value_heads,
        "partial_rotary_factor": arch.partial_rotary_factor,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_scaling": (
            {"type": "longrope", "short_factor": short, "long_factor": long} if longrope else None
        ),
        "rope_theta": arch.rope_theta,
        "sliding_window": 262144,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": arch.vocab_size,
    }
    if arch.partial_rotary_factor == 1.0:
        del config["partial_rotary_factor"]
    return config


# Random-weight styles. "trained" (the default) behaves like a trained model where
# validation needs it to; "flat" is the earlier model (near-uniform attention), kept to
# compare against.
STYLES = ("trained", "flat")
STATS_NAME = "random-checkpoint-stats.json"

# Gain of the q and k rows of qkv_proj: attention logits of std ~QK_GAIN^2 (~4.4), so a
# query spreads over ~2 of 16 positions (entropy ~0.7 nats, uniform 2.77) as trained
# heads do; at gain 1 attention is near uniform and attention bugs stay invisible.
QK_GAIN = 1.6
# Massive activations: in this early layer, a few MLP units fire on the BOS token only and
# write a few hundred into MASSIVE_CHANNELS; the residual carries it to the last layer.
MASSIVE_LAYER = 1
MASSIVE_VALUE = 300.0
_UNIT_PROJECTION = 8.0


def massive_channels(hidden_size: int) -> tuple[int, ...]:
    return (hidden_size // 5, (3 * hidden_size) // 4)


def _outlier_channels(hidden_size: int) -> torch.Tensor:
    """Channels whose down_proj rows are larger: the residual stream's outliers."""
    return torch.arange(3) * (hidden_size // 3) + 1


def _trigger_channels(hidden_size: int) -> torch.Tensor:
    """The few channels BOS's embedding lies on (no massive or outlier channel)."""
    h = hidden_size
    return torch.tensor([h // 8, (2 * h) // 5, (3 * h) // 5, h - 2])


def _trigger_direction(arch: Architecture, seed: int) -> torch.Tensor:
    """A unit vector on the trigger channels only, so the final norm can mute it: BOS's
    large embedding row must not dominate the tied LM head's logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.zeros(arch.hidden_size)
    channels = _trigger_channels(arch.hidden_size)
    u[channels] = torch.randn(len(channels), generator=gen).sign()
    return u / u.norm()


@dataclass(frozen=True)
class _Trigger:
    """The BOS direction the massive-activation units respond to, in hidden space."""

    direction: torch.Tensor  # (hidden,) unit vector


def _random_layer(
    arch: Architecture,
    layer: int,
    gen: torch.Generator,
    style: str = "trained",
    trigger: _Trigger | None = None,
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors with trained-like scales.

    Projections have unit gain (std 1/sqrt(fan_in)), norm gains scatter around 1, and the
    block outputs grow with depth, with a few outlier channels, so the residual stream
    grows through the layers as in a trained model. The "trained" style also peaks the
    attention (q/k gain) and, in MASSIVE_LAYER, adds units that fire on the BOS direction.
    """
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    nq, nkv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    depth = 1.0 + 2.0 * layer / max(arch.num_hidden_layers - 1, 1)

    def mat(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) * (gain / math.sqrt(inp))

    def gains(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    # Drawn in the flat model's order, so style "flat" reproduces it exactly.
    down = mat(h, i, 0.5 * depth)
    outliers = _outlier_channels(h)
    down[outliers] *= 6.0
    p = f"model.layers.{layer}."
    tensors = {
        p + "input_layernorm.weight": gains(h),
        p + "self_attn.qkv_proj.weight": mat(nq + 2 * nkv, h),
        p + "self_attn.o_proj.weight": mat(h, arch.num_attention_heads * d, 0.5 * depth),
        p + "post_attention_layernorm.weight": gains(h),
        p + "mlp.gate_up_proj.weight": mat(2 * i, h),
        p + "mlp.down_proj.weight": down,
    }
    if style == "trained":
        # Outlier channels 3x (not 6x) the others: peaked attention already passes more of
        # each upstream rounding error on, and 6x made INT8 shards fail on that alone.
        down[outliers] *= 0.5
        tensors[p + "self_attn.qkv_proj.weight"][: nq + nkv] *= QK_GAIN
        if trigger is not None and layer == min(MASSIVE_LAYER, arch.num_hidden_layers - 1):
            _add_massive_units(arch, tensors[p + "mlp.gate_up_proj.weight"], down, trigger, gen)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


def _add_massive_units(
    arch: Architecture,
    gate_up: torch.Tensor,  # (2I, H): gate rows, then up rows
    down: torch.Tensor,  # (H, I)
    trigger: _Trigger,
    gen: torch.Generator,
) -> None:
    """Make a few MLP units respond to the trigger direction and write massive values.

    On the normed input x (rms 1), a unit with gate and up rows a*u computes
    silu(a x.u) * a x.u: small for an ordinary token (x.u ~ N(0, 1)) but about
    (a sqrt(H))^2 for BOS, whose normed state lies near u.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    # A few units (as many as a tiny model has at any width): each carries a sizeable part
    # of the massive value, so its down_proj weights set their INT8 row scales, rather than
    # vanishing below them (at 3072 wide, 512 units each writing 3e-4 rounded to 0).
    n = max(4, min(16, i // 16))
    units = torch.arange(n) * (i // n)
    u = trigger.direction
    # Each row is u plus its own noise (as large as u): BOS still dominates every unit, and
    # the rows' INT8 rounding errors are independent, so they average out over the units.
    # Scaled so BOS's projection on a row is the same at any width (1 at hidden 64).
    scale = _UNIT_PROJECTION / math.sqrt(h)

    def rows() -> torch.Tensor:
        return scale * (u[None] + torch.randn(n, h, generator=gen) / math.sqrt(h))  # (n, H)

    gate_up[units] = rows()
    gate_up[i + units] = rows()
    # BOS's normed state lies along u (x.u ~ sqrt(H)): each unit gives ~_UNIT_PROJECTION^2.
    per_unit = _UNIT_PROJECTION**2
    weight = MASSIVE_VALUE / (n * per_unit)
    for c in massive_channels(h):
        down[c, units] = weight * (1.0 + 0.1 * torch.randn(n, generator=gen))
    # The units' other outputs stay ordinary.
    others = torch.ones(h, dtype=torch.bool)
    others[list(massive_channels(h))] = False
    rows_out = others.nonzero().squeeze(1)
    down[rows_out[:, None], units[None]] *= 0.1


def _random_embedding(
    arch: Architecture, gen: torch.Generator, trigger: _Trigger | None = None
) -> torch.Tensor:
    """Token rows whose norms spread log-normally, as trained embeddings' do.

    With the head tied to it, that spread makes the logits heavy-tailed: greedy decoding
    picks clear winners, as a trained model does, instead of near-ties among equals. With a
    trigger, the BOS row points along its direction, with a norm that keeps it dominant
    through the first layers (where the massive-activation units read it).
    """
    rows = torch.randn(arch.vocab_size, arch.hidden_size, generator=gen) * 0.02
    # Trained style: heavier-tailed norms, so the next-token distribution is peaked.
    spread = 1.5 if trigger is not None else 0.75
    norms = torch.exp(spread * torch.randn(arch.vocab_size, 1, generator=gen))
    rows = rows * norms
    if trigger is not None:
        rows[bos_token_id(arch)] = trigger.direction * math.sqrt(arch.hidden_size)
    return rows.to(torch.bfloat16)


def _final_norm(arch: Architecture, gen: torch.Generator, trigger: _Trigger | None) -> torch.Tensor:
    """Final norm gains; the trained style mutes the channels that carry outliers (massive,
    outlier and BOS-trigger channels), as trained final norms do: their large values (and
    errors) would otherwise decide the tied head's logits."""
    h = arch.hidden_size
    gains = 1.0 + 0.1 * torch.randn(h, generator=gen)
    if trigger is not None:
        loud = [*_trigger_channels(h).tolist(), *massive_channels(h), *_outlier_channels(h)]
        gains[torch.tensor(loud)] = 0.01
    return gains.to(torch.bfloat16)


def bos_token_id(arch: Architecture) -> int:
    """The BOS id random checkpoints declare (the last id, as hf_config_dict writes it)."""
    return arch.vocab_size - 1


def write_random_checkpoint(
    out_dir: str | Path,
    arch: Architecture,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: Callable[[str], None] | None = None,
    style: str = "trained",
) -> Path:
    """Write a random-weight checkpoint in exactly the format of a real one.

    Sharded bf16 safetensors + model.safetensors.index.json + config.json, built in a
    temporary folder and renamed into place. Layers are generated and written a shard
    file at a time, so memory stays near one shard even at full size.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it")
    if style not in STYLES:
        raise CheckpointError(f"unknown random-checkpoint style {style!r}; choose {STYLES}")
    gen = torch.Generator().manual_seed(seed)
    trigger = None
    if style == "trained":
        trigger = _Trigger(_trigger_direction(arch, seed))

    def groups() -> Iterable[dict[str, torch.Tensor]]:
        yield {
            "model.embed_tokens.weight": _random_embedding(arch, gen, trigger),
            "model.norm.weight": _final_norm(arch, gen, trigger),
        }
        for layer in range(arch.num_hidden_layers):
            if progress:
                progress(f"layer {layer + 1}/{arch.num_hidden_layers}")
            yield _random_layer(arch, layer, gen, style, trigger)
        if not arch.tie_word_embeddings:
            yield {
                "lm_head.weight": (
                    torch.randn(arch.vocab_size, arch.hidden_size, generator=gen) * 0.02
                ).to(torch.bfloat16)
            }

    need = phi3_weight_bytes(hf_config_dict(arch))  # bf16
    with atomic_path(out_dir, overwrite=overwrite, expected_bytes=need) as tmp:
        tmp.mkdir()
        save_sharded(tmp, groups(), max_shard_bytes)
        write_config(tmp, hf_config_dict(arch))
        if progress:
            progress("measuring activation statistics with transformers")
        stats = random_checkpoint_stats(Checkpoint(tmp), style, seed)
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=2) + "\n")
    return out_dir


def random_checkpoint_stats(checkpoint: Checkpoint, style: str, seed: int) -> dict[str, Any]:
    """The statistics `random-checkpoint` writes beside the weights (STATS_NAME).

    Measured on BOS + 15 seeded token ids, with transformers' own layers.
    """
    import numpy as np

    from anechain.golden import activation_statistics

    arch = checkpoint.architecture
    ids = np.random.default_rng(0).integers(0, arch.vocab_size, size=15).tolist()
    return {
        "schema": "anechain.random-checkpoint-stats/1",
        "style": style,
        "seed": seed,
        "massive_channels": list(massive_channels(arch.hidden_size)) if style == "trained" else [],
        **activation_statistics(checkpoint, [bos_token_id(arch), *ids]),
    }


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder (tests alter copies, never the original)."""
    shutil.copytree(src, dst)
    return Path(dst)
