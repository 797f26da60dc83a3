"""The I/O contract every layer shard of a model shares, and the metadata each package carries.

Every shard of one model takes and returns the same tensors, so shards chain:

    inputs   hidden_states   (1, hidden, 1, 1)        fp16  ANE layout (B, C, 1, S), S=1
             position        (1,)                     int32 KV write position p
             cos, sin        (1, 1, 1, rotary_dim)    fp16  LongRoPE, attention scaling applied
             attention_mask  (1, 1, 1, context)       fp16  0 for 0..p, MASK_VALUE after
    outputs  output_hidden_states (1, hidden, 1, 1)   fp16
    states   key_cache, value_cache (layers, kv_heads, context, head_dim) fp16

Only the states' first dimension differs between shards (their layer count).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anechain.config import Architecture, LayerRange, from_dict
from anechain.errors import PackageError

# Large finite negative: -inf meeting -inf in fp16 softmax gives NaN on the ANE.
MASK_VALUE = -30000.0

KIND_LAYERS = "layers"
KIND_HEAD = "head"
META_PREFIX = "anechain."


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float16", "int32"


@dataclass(frozen=True)
class IOContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: [{**asdict(t), "shape": list(t.shape)} for t in v]
            for k, v in (
                ("inputs", self.inputs),
                ("outputs", self.outputs),
                ("states", self.states),
            )
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IOContract:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in data[key])

        return cls(specs("inputs"), specs("outputs"), specs("states"))

    def chain_key(self) -> dict[str, Any]:
        """What must be equal between shards of one model: all but the states' layer count."""
        d = self.to_dict()
        for s in d["states"]:
            s["shape"] = ["layers", *s["shape"][1:]]
        return d


def head_contract(arch: Architecture, num_chunks: int) -> IOContract:
    """Final norm + LM head: each vocabulary chunk's largest logit and its index."""
    return IOContract(
        inputs=(TensorSpec("hidden_states", (1, arch.hidden_size, 1, 1), "float16"),),
        outputs=(
            TensorSpec("chunk_max", (1, num_chunks), "float16"),
            TensorSpec("chunk_argmax", (1, num_chunks), "int32"),
        ),
        states=(),
    )


def layer_contract(arch: Architecture, context_length: int, num_layers: int) -> IOContract:
    hidden, rot = arch.hidden_size, arch.rotary_dim
    state_shape = (num_layers, arch.num_key_value_heads, context_length, arch.head_dim)
    return IOContract(
        inputs=(
            TensorSpec("hidden_states", (1, hidden, 1, 1), "float16"),
            TensorSpec("position", (1,), "int32"),
            TensorSpec("cos", (1, 1, 1, rot), "float16"),
            TensorSpec("sin", (1, 1, 1, rot), "float16"),
            TensorSpec("attention_mask", (1, 1, 1, context_length), "float16"),
        ),
        outputs=(TensorSpec("output_hidden_states", (1, hidden, 1, 1), "float16"),),
        states=(
            TensorSpec("key_cache", state_shape, "float16"),
            TensorSpec("value_cache", state_shape, "float16"),
        ),
    )


@dataclass(frozen=True)
class ShardMetadata:
    """Provenance written into each package's user-defined metadata (all values strings)."""

    version: str
    kind: str
    layers: LayerRange | None  # None for the head
    num_hidden_layers: int
    checkpoint_fingerprint: str
    weights_fingerprint: str
    quantization: str
    context_length: int
    architecture: Architecture
    contract: IOContract
    extra: dict[str, str] = field(default_factory=dict)

    def to_user_metadata(self) -> dict[str, str]:
        p = META_PREFIX
        return {
            f"{p}version": self.version,
            f"{p}kind": self.kind,
            f"{p}layers": str(self.layers) if self.layers is not None else "",
            f"{p}num_hidden_layers": str(self.num_hidden_layers),
            f"{p}checkpoint_fingerprint": self.checkpoint_fingerprint,
            f"{p}weights_fingerprint": self.weights_fingerprint,
            f"{p}quantization": self.quantization,
            f"{p}context_length": str(self.context_length),
            f"{p}architecture": json.dumps(asdict(self.architecture), sort_keys=True),
            f"{p}contract": json.dumps(self.contract.to_dict(), sort_keys=True),
            **{f"{p}{k}": v for k, v in self.extra.items()},
        }

    @classmethod
    def from_user_metadata(cls, meta: dict[str, str], where: str = "package") -> ShardMetadata:
        p = META_PREFIX
        if f"{p}version" not in meta:
            raise PackageError(f"{where} is not an anechain shard (no {p}version metadata)")
        known = {
            "version",
            "kind",
            "layers",
            "num_hidden_layers",
            "checkpoint_fingerprint",
            "weights_fingerprint",
            "quantization",
            "context_length",
            "architecture",
            "contract",
        }
        try:
            return cls(
                version=meta[f"{p}version"],
                kind=meta[f"{p}kind"],
                layers=LayerRange.parse(meta[f"{p}layers"]) if meta[f"{p}layers"] else None,
                num_hidden_layers=int(meta[f"{p}num_hidden_layers"]),
                checkpoint_fingerprint=meta[f"{p}checkpoint_fingerprint"],
                weights_fingerprint=meta[f"{p}weights_fingerprint"],
                quantization=meta[f"{p}quantization"],
                context_length=int(meta[f"{p}context_length"]),
                architecture=from_dict(Architecture, json.loads(meta[f"{p}architecture"])),
                contract=IOContract.from_dict(json.loads(meta[f"{p}contract"])),
                extra={
                    k[len(p) :]: v
                    for k, v in meta.items()
                    if k.startswith(p) and k[len(p) :] not in known
                },
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PackageError(f"{where} has incomplete anechain metadata ({exc})") from None


def read_package_metadata(path: str | Path) -> ShardMetadata:
    """Read a package's anechain metadata without loading its weights."""
    from anechain.package import load_spec

    spec = load_spec(path)
    return ShardMetadata.from_user_metadata(
        dict(spec.description.metadata.userDefined), where=str(path)
    )
