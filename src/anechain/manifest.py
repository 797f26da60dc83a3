"""The runtime manifest: which validated shards chain into the model, and how to feed them.

This module holds the manifest's typed form (dataclasses mirroring the JSON), `load_manifest`
(the JSON Schema shipped in schemas/, every path inside the manifest's folder) and
`verify_manifest` (also recomputes coverage, contract, every gate and every file's sha256).
`manifest_build.build_manifest` writes one from validation reports; `manifest_render` shows it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from anechain.config import Architecture, LayerRange, to_dict
from anechain.contract import KIND_HEAD, KIND_LAYERS, MASK_VALUE, IOContract, TensorSpec
from anechain.errors import ConfigError, ManifestError
from anechain.fsutil import sha256_tree
from anechain.jsonio import dumps_json
from anechain.report import OPS, GateSpec, gate_specs
from anechain.shards import (
    ShardRecord,
    architecture_problems,
    check_manifest_path,
    check_topology,
)

# 2: `gates` (the bounds the shards were held to); validation gates relative to scale.
SCHEMA_VERSION = 2


class _JSON:
    """to_dict for the manifest's dataclasses, whose fields mirror the JSON."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _load(tp: Any, value: Any) -> Any:
    """Build annotated type `tp` from schema-checked JSON (dataclasses, tuples, optionals)."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.name in value]
        return tp(**{n: _load(hints[n], value[n]) for n in names})
    if typing.get_origin(tp) is tuple:
        return tuple(_load(typing.get_args(tp)[0], v) for v in value)
    if typing.get_origin(tp) is types.UnionType and value is not None:
        return _load(next(a for a in typing.get_args(tp) if a is not type(None)), value)
    return value


@dataclass(frozen=True)
class FileRef(_JSON):
    """A file or folder: path relative to the manifest (POSIX), sha256_tree, total size."""

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Gate(_JSON):
    name: str
    value: float | None
    bound: float | None
    op: str  # ">=", "<=", ...
    passed: bool


@dataclass(frozen=True)
class Residency(_JSON):
    status: str  # "checked" | "report_only" | "not_checked"
    passed: bool | None
    counts: dict[str, int] | None


@dataclass(frozen=True)
class Validation(_JSON):
    """A shard's validation report, summarised."""

    verdict: str
    backend: str
    steps: int
    gates: tuple[Gate, ...]
    metrics: dict[str, float | None]
    residency: Residency
    created: str
    versions: dict[str, str | None]


@dataclass(frozen=True)
class ShardEntry(_JSON):
    """One shard: decoder layers [start, end), its files, its KV states and its validation."""

    start: int
    end: int
    package: FileRef
    compiled: FileRef | None  # the .mlmodelc beside the package, if it existed at build time
    weights_fingerprint: str
    states: tuple[TensorSpec, ...]  # (layers, kv_heads, context, head_dim) each
    validation: Validation
    # Function name -> tokens per call ({"decode": 1, "prefill": T}); None: decode only.
    functions: dict[str, int] | None = None

    @property
    def prefill_tokens(self) -> int:
        return (self.functions or {}).get("prefill", 0)

    @property
    def layers(self) -> LayerRange:
        return LayerRange(self.start, self.end)


@dataclass(frozen=True)
class Model(_JSON):
    architecture: Architecture
    num_hidden_layers: int
    checkpoint_fingerprint: str


@dataclass(frozen=True)
class Rope(_JSON):
    """RoPE numbers a runtime needs to build cos/sin without the checkpoint."""

    FROM_ARCHITECTURE: typing.ClassVar = (
        "rope_theta",
        "partial_rotary_factor",
        "rotary_dim",
        "original_max_position_embeddings",
        "max_position_embeddings",
    )

    rope_theta: float
    partial_rotary_factor: float
    rotary_dim: int
    original_max_position_embeddings: int
    max_position_embeddings: int
    # Host-side data from the checkpoint when available (rope.RopeParameters.to_dict()).
    precomputed: dict[str, Any] | None = None


@dataclass(frozen=True)
class Mask(_JSON):
    input: str = "attention_mask"
    attended_value: float = 0.0
    masked_value: float = MASK_VALUE
    rule: str = "attended_value at positions 0..p (p = the step's position), masked_value after"


@dataclass(frozen=True)
class StepIO(_JSON):
    """Inputs and outputs every shard shares (each shard lists its own states)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class EmbeddingEntry(_JSON):
    """The fp16 token table the host gathers rows from (tied with the head in Phi-4-mini)."""

    file: FileRef
    shape: tuple[int, ...]  # (vocab_size, hidden_size)
    dtype: str


@dataclass(frozen=True)
class HeadEntry(_JSON):
    """Final norm + LM head: per-chunk max logit and index; the host reduces the chunks."""

    package: FileRef
    compiled: FileRef | None
    weights_fingerprint: str
    chunk_rows: int
    contract: StepIO
    validation: Validation


@dataclass(frozen=True)
class TokenizerEntry(_JSON):
    """The checkpoint's tokenizer files, copied beside the manifest, and the ids that end
    generation (config, generation config and tokenizer eos)."""

    files: tuple[FileRef, ...]
    eos_token_ids: tuple[int, ...]

    @property
    def folder(self) -> str:
        return self.files[0].path.rpartition("/")[0]


@dataclass(frozen=True)
class Manifest(_JSON):
    schema_version: int
    created: str  # UTC, ISO 8601
    versions: dict[str, str | None]  # of the environment that built the manifest
    model: Model
    context_length: int
    rope: Rope
    mask: Mask
    contract: StepIO
    # The bounds every shard's gates were required to meet (config.Gates, by field name).
    gates: dict[str, float]
    shards: tuple[ShardEntry, ...]  # in layer order
    embedding: EmbeddingEntry | None = None
    head: HeadEntry | None = None
    tokenizer: TokenizerEntry | None = None

    def files(self) -> list[tuple[str, FileRef]]:
        """Every referenced file, with what it is."""
        out: list[tuple[str, FileRef]] = []
        for sh in self.shards:
            out += [(str(sh.layers), ref) for ref in (sh.package, sh.compiled) if ref]
        if self.head is not None:
            out += [("head", ref) for ref in (self.head.package, self.head.compiled) if ref]
        if self.embedding is not None:
            out.append(("embedding", self.embedding.file))
        if self.tokenizer is not None:
            out += [("tokenizer", ref) for ref in self.tokenizer.files]
        return out

    def records(self) -> list[ShardRecord]:
        """The shards as topology records (see anechain.shards)."""
        m, io = self.model, self.contract
        return [
            ShardRecord(
                s.package.path,
                s.layers,
                m.num_hidden_layers,
                m.checkpoint_fingerprint,
                IOContract(io.inputs, io.outputs, s.states),
                self.context_length,
            )
            for s in self.shards
        ]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for shard in data["shards"]:  # unrecorded functions (decode only): the v1 entry
            if shard["functions"] is None:
                del shard["functions"]
        if data["tokenizer"] is None:  # as manifests without one always were
            del data["tokenizer"]
        return data

    def to_json(self) -> str:
        return dumps_json(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """From a schema-checked dict (load_manifest checks the schema first)."""
        try:
            manifest: Manifest = _load(cls, data)
        except ConfigError as exc:  # Architecture's own checks
            raise ManifestError(f"manifest model.architecture is invalid: {exc}") from None
        return manifest


@dataclass(frozen=True)
class Check(_JSON):
    """One thing verify_manifest established."""

    name: str
    detail: str


def gate_problems(
    gates: tuple[Gate, ...], mandatory: tuple[GateSpec, ...], required: dict[str, float]
) -> list[str]:
    """Why a validation's gates do not prove the shard against `required` bounds (by
    config.Gates field): each mandatory gate present once, with its comparison, a bound at
    least as strict, and a value that meets it."""
    specs = {s.name: s for s in mandatory}
    names = [g.name for g in gates]
    problems = [f"gate {n} is missing" for n in specs if n not in names]
    problems += [f"gate {n} is listed twice" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [f"gate {n} is unknown" for n in names if n not in specs]
    for g in gates:
        spec = specs.get(g.name)
        if spec is None:
            continue
        need = 0.0 if spec.bound_field is None else required.get(spec.bound_field)
        if g.op != spec.op:
            problems.append(f"gate {g.name} compares with {g.op!r}, not {spec.op!r}")
        elif need is None:
            problems.append(f"the manifest records no bound {spec.bound_field} for gate {g.name}")
        elif g.bound is None or spec.looser(g.bound, need):
            problems.append(f"gate {g.name} bound {g.bound} is looser than {g.op} {need:g}")
        elif g.value is None or not OPS[g.op](g.value, g.bound):
            problems.append(f"gate {g.name} value {g.value} does not meet {g.op} {g.bound:g}")
    return problems


def load_embedding_table(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The fp16 (vocab, hidden) table, memory-mapped; anything else is one ManifestError.

    The manifest's sha256 only says the file is the one it was signed with: a re-signed
    table of the wrong shape or dtype is refused here, and pickled (object) arrays are
    never loaded.
    """
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "Python objects" in str(exc) or "allow_pickle" in str(exc):  # an object array
            raise ManifestError(
                f"embedding {path} holds Python objects, not numbers; anechain never loads "
                "pickled data"
            ) from None
        raise ManifestError(f"embedding {path} is not a readable .npy table ({exc})") from None
    except (OSError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"embedding {path} is not a readable .npy table ({detail})") from None
    if not isinstance(table, np.ndarray) or table.dtype != np.float16 or table.shape != shape:
        found = f"{table.dtype} {table.shape}" if isinstance(table, np.ndarray) else "not an array"
        raise ManifestError(f"embedding {path} is {found}; the model needs float16 {shape}")
    return table


def host_data_problems(m: Manifest) -> list[str]:
    """What the host reads from the manifest alone (RoPE tables, the head's chunk rows, the
    embedding's shape) and the model's architecture disagree on: a runtime trusting such a
    value computes wrong tokens with every file intact."""
    arch, rope, problems = m.model.architecture, m.rope, []
    for name in Rope.FROM_ARCHITECTURE:
        if getattr(rope, name) != getattr(arch, name):
            problems.append(
                f"rope.{name} is {getattr(rope, name)} but the architecture's is "
                f"{getattr(arch, name)}"
            )
    if rope.precomputed is not None:
        from anechain.rope import RopeParameters

        try:
            params = RopeParameters.from_dict(rope.precomputed)
            short = np.asarray(params.inv_freq_short, dtype=np.float64)
            long = np.asarray(params.inv_freq_long, dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            return [*problems, f"rope.precomputed is malformed ({exc})"]
        half = arch.rotary_dim // 2
        if short.shape != (half,) or long.shape != (half,):
            problems.append(
                f"rope.precomputed has {short.size} short and {long.size} long frequencies; "
                f"rotary_dim {arch.rotary_dim} needs {half} each"
            )
        elif not (np.isfinite(short).all() and np.isfinite(long).all()):
            problems.append("rope.precomputed has non-finite frequencies")
        elif (short <= 0).any() or (long <= 0).any():
            problems.append("rope.precomputed has frequencies <= 0")
        elif np.array_equal(short, long):
            # No long-context scaling: the tables are the plain RoPE of rope_theta and the
            # cos/sin are not rescaled (transformers' default rope parameters).
            default = 1.0 / arch.rope_theta ** (np.arange(0, arch.rotary_dim, 2) / arch.rotary_dim)
            if not np.allclose(short, default, rtol=1e-5, atol=0):
                problems.append(
                    "rope.precomputed frequencies are not those of rope_theta "
                    f"{arch.rope_theta:g} over rotary_dim {arch.rotary_dim}"
                )
            if params.attention_scaling != 1.0:
                problems.append(
                    f"rope.precomputed.attention_scaling is {params.attention_scaling:g} "
                    "without long-context scaling (1 expected)"
                )
        if not (math.isfinite(params.attention_scaling) and params.attention_scaling > 0):
            problems.append("rope.precomputed.attention_scaling is not a positive number")
        if params.original_max_position_embeddings != arch.original_max_position_embeddings:
            problems.append(
                "rope.precomputed.original_max_position_embeddings "
                f"{params.original_max_position_embeddings} differs from the architecture's "
                f"{arch.original_max_position_embeddings}"
            )
    if m.head is not None:
        chunks, rows = m.head.contract.outputs[0].shape[-1], m.head.chunk_rows
        if not 0 < rows or -(-arch.vocab_size // rows) != chunks:
            problems.append(
                f"head.chunk_rows {rows} does not split vocab_size {arch.vocab_size} into the "
                f"head's {chunks} chunks"
            )
    if m.embedding is not None:
        if tuple(m.embedding.shape) != (arch.vocab_size, arch.hidden_size):
            problems.append(
                f"embedding.shape {list(m.embedding.shape)} is not "
                f"[{arch.vocab_size}, {arch.hidden_size}] (vocab_size, hidden_size)"
            )
    return problems


# ---- load and verify ------------------------------------------------------------------------


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, shipped in anechain/schemas/."""
    text = resources.files("anechain").joinpath("schemas/manifest.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_check(data: Any, where: Path) -> None:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "top level"
        message = error.message.splitlines()[0]
        message = message if len(message) <= 160 else message[:157] + "..."
        raise ManifestError(
            f"manifest {where} does not match the manifest schema at {at}: {message}"
        )


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest, checking its schema and that every path stays inside its folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON ({exc})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest {path} has schema_version {version}; this anechain reads {SCHEMA_VERSION}"
        )
    schema_check(data, path)
    for i, shard in enumerate(data["shards"]):
        for key in ("package", "compiled"):
            if shard[key] is not None:
                check_manifest_path(
                    shard[key]["path"], path.parent, f"manifest {path}: shards[{i}].{key}"
                )
    for key, refs in (
        ("head", ("package", "compiled")),
        ("embedding", ("file",)),
    ):
        entry = data.get(key)
        for ref in refs if entry else ():
            if entry[ref] is not None:
                check_manifest_path(
                    entry[ref]["path"], path.parent, f"manifest {path}: {key}.{ref}"
                )
    for i, ref in enumerate((data.get("tokenizer") or {}).get("files", ())):
        check_manifest_path(ref["path"], path.parent, f"manifest {path}: tokenizer.files[{i}]")
    return Manifest.from_dict(data)


def verify_manifest(path: str | Path) -> list[Check]:
    """Load a manifest and re-check all of it, hashing every file; ManifestError on a problem."""
    path = Path(path)
    m = load_manifest(path)
    checks = [
        Check("schema", f"schema_version {m.schema_version}"),
        Check("paths", "every path stays inside the manifest's folder"),
    ]
    if m.model.num_hidden_layers != m.model.architecture.num_hidden_layers:
        raise ManifestError(
            f"manifest {path}: model.num_hidden_layers differs from "
            f"model.architecture.num_hidden_layers"
        )
    try:
        records = check_topology(m.records())
        problems = architecture_problems([(records[0], m.model.architecture)])
        if problems:
            raise ManifestError(problems[0])
    except ManifestError as exc:
        raise ManifestError(f"manifest {path}: {exc}") from None
    if [r.layers for r in records] != [s.layers for s in m.shards]:
        raise ManifestError(f"manifest {path}: shards are not listed in layer order")
    checks += [
        Check("coverage", f"{len(records)} shards cover 0:{m.model.num_hidden_layers}"),
        Check("contract", "one I/O contract, agreeing with the architecture"),
    ]
    if m.head is not None and m.head.contract.inputs[0].shape != m.contract.outputs[0].shape:
        raise ManifestError(f"manifest {path}: the head does not take the shards' output")
    problems = host_data_problems(m)
    if problems:
        raise ManifestError(f"manifest {path}: {problems[0]}")
    checks.append(Check("host data", "RoPE, head chunks and embedding agree with the model"))
    validations = [(str(s.layers), KIND_LAYERS, s.functions, s.validation) for s in m.shards]
    validations += [("head", KIND_HEAD, None, m.head.validation)] if m.head else []
    for label, kind, functions, v in validations:
        # A long window's gates come all together or not at all (whether a config needs
        # one is checked when the manifest is built).
        long = any(g.name.startswith("long_") for g in v.gates)
        problems = gate_problems(v.gates, gate_specs(kind, functions, long), m.gates)
        if problems:
            raise ManifestError(f"manifest {path}: {label}: {problems[0]}")
    checks.append(Check("gates", f"{len(validations)} validations meet the manifest's gates"))
    for what, ref in m.files():
        file = path.parent / ref.path
        if not file.exists():
            raise ManifestError(f"manifest {path}: {ref.path} ({what}) is missing")
        digest = sha256_tree(file)
        if digest != ref.sha256:
            raise ManifestError(
                f"manifest {path}: {ref.path} ({what}) changed since "
                f"the manifest was built (sha256 {digest[:12]}, manifest "
                f"says {ref.sha256[:12]})"
            )
        checks.append(Check("sha256", ref.path))
    return checks
