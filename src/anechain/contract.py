"""The I/O contract every layer shard of a model shares, and the metadata each package carries.

Every shard of one model takes and returns the same tensors, so shards chain. A function
that runs T tokens at once (decode: T = 1; prefill: T = export.prefill_tokens) takes:

    inputs   hidden_states   (1, hidden, 1, T)        fp16  ANE layout (B, C, 1, S), S=T
             position        (1,)                     int32 KV write offset p (T rows: p..p+T-1)
             cos, sin        (1, 1, T, rotary_dim)    fp16  LongRoPE per position, scaling applied
             attention_mask  (1, 1, T, context)       fp16  row i: 0 for 0..p+i, MASK_VALUE after
    outputs  output_hidden_states (1, hidden, 1, T)   fp16
    states   key_cache, value_cache (layers, kv_heads, context, head_dim) fp16

Decode is this contract at T = 1. A package with prefill holds two functions, `decode`
(the default) and `prefill`, sharing the weights and the states; a decode-only package holds
one function, `main`. Only the states' first dimension differs between shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anechain.config import Architecture, LayerRange, from_dict
from anechain.errors import ConfigError, PackageError

# Large finite negative: -inf meeting -inf in fp16 softmax gives NaN on the ANE.
MASK_VALUE = -30000.0

KIND_LAYERS = "layers"
# Function names. The decode function is always the package's default function: `main` in a
# decode-only package, `decode` beside `prefill` in a two-function one.
FUNCTION_MAIN = "main"
FUNCTION_DECODE = "decode"
FUNCTION_PREFILL = "prefill"
DECODE_ONLY = {FUNCTION_MAIN: 1}
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


def layer_contract(
    arch: Architecture, context_length: int, num_layers: int, tokens: int = 1
) -> IOContract:
    """The I/O of a layer function running `tokens` positions at once (decode: 1)."""
    if not 0 < tokens <= context_length:
        raise ConfigError(f"a function runs 1..{context_length} tokens, not {tokens}")
    hidden, rot, t = arch.hidden_size, arch.rotary_dim, tokens
    state_shape = (num_layers, arch.num_key_value_heads, context_length, arch.head_dim)
    return IOContract(
        inputs=(
            TensorSpec("hidden_states", (1, hidden, 1, t), "float16"),
            TensorSpec("position", (1,), "int32"),
            TensorSpec("cos", (1, 1, t, rot), "float16"),
            TensorSpec("sin", (1, 1, t, rot), "float16"),
            TensorSpec("attention_mask", (1, 1, t, context_length), "float16"),
        ),
        outputs=(TensorSpec("output_hidden_states", (1, hidden, 1, t), "float16"),),
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
    contract: IOContract  # the decode function's (T = 1)
    extra: dict[str, str] = field(default_factory=dict)
    # Function name -> tokens per call. Packages without the key are decode-only (`main`).
    functions: dict[str, int] = field(default_factory=lambda: dict(DECODE_ONLY))

    @property
    def prefill_tokens(self) -> int:
        """T of the prefill function, 0 for a decode-only package."""
        return self.functions.get(FUNCTION_PREFILL, 0)

    def function_contract(self, function: str) -> IOContract:
        """The I/O contract of one of the package's functions (same states for all)."""
        if function not in self.functions:
            raise PackageError(
                f"the package has no function {function!r} (it has {', '.join(self.functions)})"
            )
        if self.layers is None:
            return self.contract
        return layer_contract(
            self.architecture,
            self.context_length,
            self.layers.num_layers,
            self.functions[function],
        )

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
            f"{p}functions": json.dumps(self.functions, sort_keys=True),
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
            "functions",
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
                functions=_functions(meta.get(f"{p}functions")),
                extra={
                    k[len(p) :]: v
                    for k, v in meta.items()
                    if k.startswith(p) and k[len(p) :] not in known
                },
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PackageError(f"{where} has incomplete anechain metadata ({exc})") from None


def _functions(text: str | None) -> dict[str, int]:
    """`anechain.functions` JSON: {"main": 1} or {"decode": 1, "prefill": T} with T >= 1."""
    if text is None:
        return dict(DECODE_ONLY)
    data = json.loads(text)
    functions = {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
    two = {FUNCTION_DECODE: 1, FUNCTION_PREFILL: functions.get(FUNCTION_PREFILL, 0)}
    if functions != DECODE_ONLY and not (functions == two and two[FUNCTION_PREFILL] >= 1):
        raise ValueError(f"functions {text} are neither main:1 nor decode:1 + prefill:T")
    return functions


def function_names(prefill_tokens: int) -> dict[str, int]:
    """The functions a layer package holds for `export.prefill_tokens` (0: decode only)."""
    if prefill_tokens < 0:
        raise ConfigError(f"export.prefill_tokens must be >= 0, got {prefill_tokens}")
    if prefill_tokens == 0:
        return dict(DECODE_ONLY)
    return {FUNCTION_DECODE: 1, FUNCTION_PREFILL: prefill_tokens}


def read_package_metadata(path: str | Path) -> ShardMetadata:
    """Read a package's anechain metadata without loading its weights."""
    from anechain.package import load_spec

    spec = load_spec(path)
    return ShardMetadata.from_user_metadata(
        dict(spec.description.metadata.userDefined), where=str(path)
    )
