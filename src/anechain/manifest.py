"""The runtime manifest: which validated shards chain into the model, and how to feed them.

`build_manifest` reads validation reports (never a Core ML model), checks that the shards
passed, are unchanged since validation, share one I/O contract and tile the model's layers,
and writes JSON (sorted keys, 2-space indent) atomically beside the shards. `load_manifest`
checks the JSON Schema shipped in schemas/ and that every path stays in the manifest's
folder; `verify_manifest` also recomputes coverage, contract and every file's sha256.

A shard's report is found beside its package: `layers_0_8.mlpackage` -> `layers_0_8.report.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema

from anechain import __version__
from anechain.config import Architecture, LayerRange, to_dict
from anechain.contract import KIND_HEAD, MASK_VALUE, IOContract, TensorSpec
from anechain.errors import ConfigError, ManifestError
from anechain.fsutil import atomic_write_text, sha256_tree
from anechain.jsonio import dumps_json
from anechain.shards import (
    ShardRecord,
    ValidatedHead,
    ValidatedShard,
    architecture_problems,
    check_manifest_path,
    check_topology,
    read_head_report,
    read_shard_report,
    relative_inside,
    report_kind,
)

SCHEMA_VERSION = 1


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
class Manifest(_JSON):
    schema_version: int
    created: str  # UTC, ISO 8601
    versions: dict[str, str | None]  # of the environment that built the manifest
    model: Model
    context_length: int
    rope: Rope
    mask: Mask
    contract: StepIO
    shards: tuple[ShardEntry, ...]  # in layer order
    embedding: EmbeddingEntry | None = None
    head: HeadEntry | None = None

    def files(self) -> list[tuple[str, FileRef]]:
        """Every referenced file, with what it is."""
        out: list[tuple[str, FileRef]] = []
        for sh in self.shards:
            out += [(str(sh.layers), ref) for ref in (sh.package, sh.compiled) if ref]
        if self.head is not None:
            out += [("head", ref) for ref in (self.head.package, self.head.compiled) if ref]
        if self.embedding is not None:
            out.append(("embedding", self.embedding.file))
        return out

    def records(self) -> list[ShardRecord]:
        """The shards as topology records (see anechain.topology)."""
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


def _file_ref(path: Path, root: Path, what: str, digest: str | None = None) -> FileRef:
    rel = relative_inside(path, root, what)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return FileRef(rel, digest or sha256_tree(path), sum(f.stat().st_size for f in files))


# ---- build ----------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"anechain": __version__}
    for dist in ("coremltools", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def build_manifest(
    reports: list[Path],
    out: Path,
    overwrite: bool = False,
    rope: dict[str, Any] | None = None,
    embedding: Path | None = None,
) -> Manifest:
    """Check validated shards and write their manifest to `out` atomically.

    Args:
        reports: validation reports, or shard packages whose report sits beside them
            (<name>.report.json beside <name>.mlpackage), in any order.
            A head's report (or the head package) may be among them.
        rope: host-side RoPE data (rope.RopeParameters.to_dict()), kept as rope.precomputed;
            by default the one the exporter recorded in the shards' reports.
        embedding: the fp16 token table (.npy) the host gathers from.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ManifestError(f"{out} already exists; pass --overwrite to replace it")
    if not reports:
        raise ManifestError("no shards given: pass validation reports or shard packages")
    kinds = [(Path(src), report_kind(Path(src))) for src in reports]
    heads = [read_head_report(src) for src, kind in kinds if kind == KIND_HEAD]
    if len(heads) > 1:
        raise ManifestError(f"{len(heads)} heads given ({heads[0].report}, {heads[1].report})")
    shards = [read_shard_report(src) for src, kind in kinds if kind != KIND_HEAD]
    if not shards:
        raise ManifestError("no layer shards given: pass their validation reports or packages")
    seen: dict[Path, ValidatedShard] = {}
    for s in shards:
        if (prev := seen.setdefault(s.package.resolve(), s)) is not s:
            raise ManifestError(
                f"shard {s.record.label} is given twice (reports {prev.report} and {s.report})"
            )
    if len({s.record.name for s in shards}) < len(shards):
        # The same file name in different folders: tell the shards apart by path.
        shards = [replace(s, record=replace(s.record, name=str(s.package))) for s in shards]
    check_topology([s.record for s in shards])
    shards.sort(key=lambda s: s.record.layers.start)
    first = shards[0]
    problems = architecture_problems([(s.record, s.architecture) for s in shards])
    if problems:
        raise ManifestError(problems[0])

    root = out.parent
    entries = []
    for s in shards:
        what = f"shard {s.record.label}"
        relative_inside(s.package, root, f"{what} package")
        if not s.package.is_dir():
            raise ManifestError(f"{what}: package {s.package} does not exist (report {s.report})")
        digest = sha256_tree(s.package)
        if digest != s.validated_sha256:
            raise ManifestError(
                f"{what} changed after validation: sha256 {digest[:12]} now, "
                f"{s.validated_sha256[:12]} in report {s.report}; validate it "
                f"again"
            )
        compiled = _compiled_ref(s.package, digest, root, what)
        entries.append(
            ShardEntry(
                s.record.layers.start,
                s.record.layers.end,
                _file_ref(s.package, root, f"{what} package", digest),
                compiled,
                s.weights_fingerprint,
                s.record.contract.states,
                _load(Validation, s.summary),
                s.functions,
            )
        )

    arch, rec = first.architecture, first.record
    if rope is None:
        # Every shard was exported from one checkpoint (checked above): take its RoPE data.
        ropes = [s.rope for s in shards if s.rope is not None]
        if ropes and any(r != ropes[0] for r in ropes):
            raise ManifestError("shards disagree on their RoPE parameters; export them again")
        rope = ropes[0] if ropes else None
    head_entry = _head_entry(heads[0], rec, root) if heads else None
    embedding_entry = _embedding_entry(embedding, arch, root) if embedding else None
    manifest = Manifest(
        SCHEMA_VERSION,
        datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        _versions(),
        Model(arch, arch.num_hidden_layers, rec.checkpoint_fingerprint),
        rec.context_length,
        Rope(**{k: getattr(arch, k) for k in Rope.FROM_ARCHITECTURE}, precomputed=rope),
        Mask(),
        StepIO(rec.contract.inputs, rec.contract.outputs),
        tuple(entries),
        embedding_entry,
        head_entry,
    )
    _schema_check(manifest.to_dict(), out)  # what we write must load
    try:
        atomic_write_text(out, manifest.to_json(), overwrite=overwrite)
    except FileExistsError:
        raise ManifestError(f"{out} already exists; pass --overwrite to replace it") from None
    return manifest


def _compiled_ref(package: Path, digest: str, root: Path, what: str) -> FileRef | None:
    """The .mlmodelc beside a package, if there is one, and only if it was compiled from
    exactly this package (the compile sidecar records the package's sha256)."""
    from anechain.compile import is_up_to_date

    mlmodelc = package.with_suffix(".mlmodelc")
    if not (mlmodelc.exists() or mlmodelc.is_symlink()):
        return None
    if not is_up_to_date(mlmodelc, digest):
        raise ManifestError(
            f"{what}: {mlmodelc.name} was not compiled from the validated package (stale or "
            f"unknown); run `anechain compile {package.name}` again or remove it"
        )
    return _file_ref(mlmodelc, root, f"{what} compiled model")


def _head_entry(head: ValidatedHead, rec: ShardRecord, root: Path) -> HeadEntry:
    what = f"head {head.package.name}"
    if head.checkpoint_fingerprint != rec.checkpoint_fingerprint:
        raise ManifestError(f"{what} comes from another checkpoint than shard {rec.label}")
    hidden = [i for i in head.contract.inputs if i.name == "hidden_states"]
    out = [o for o in rec.contract.outputs if o.name == "output_hidden_states"]
    if not hidden or not out or hidden[0].shape != out[0].shape:
        raise ManifestError(f"{what} does not take the shards' output_hidden_states shape")
    relative_inside(head.package, root, f"{what} package")
    if not head.package.is_dir():
        raise ManifestError(f"{what}: package {head.package} does not exist")
    digest = sha256_tree(head.package)
    if digest != head.validated_sha256:
        raise ManifestError(f"{what} changed after validation; validate it again")
    compiled = _compiled_ref(head.package, digest, root, what)
    return HeadEntry(
        _file_ref(head.package, root, f"{what} package", digest),
        compiled,
        head.weights_fingerprint,
        head.chunk_rows,
        StepIO(head.contract.inputs, head.contract.outputs),
        _load(Validation, head.summary),
    )


def _embedding_entry(path: Path, arch: Architecture, root: Path) -> EmbeddingEntry:
    import numpy as np

    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"embedding {path} is not a readable .npy table ({exc})") from None
    want = (arch.vocab_size, arch.hidden_size)
    if table.shape != want or table.dtype != np.float16:
        raise ManifestError(
            f"embedding {path} is {table.dtype} {table.shape}; the model needs float16 {want}"
        )
    return EmbeddingEntry(_file_ref(path, root, "embedding"), want, "float16")


# ---- load and verify ------------------------------------------------------------------------


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, shipped in anechain/schemas/."""
    text = resources.files("anechain").joinpath("schemas/manifest.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _schema_check(data: Any, where: Path) -> None:
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
    _schema_check(data, path)
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


# ---- show -----------------------------------------------------------------------------------


def _functions_text(functions: dict[str, int] | None) -> str:
    """`decode+prefill(T=64)`, or `decode` for a decode-only package."""
    if not functions or "prefill" not in functions:
        return "decode"
    return f"decode+prefill(T={functions['prefill']})"


_RESIDENCY_TEXT = {"checked": "checked", "report_only": "report only", "not_checked": "NOT CHECKED"}


def render_manifest(m: Manifest, path: str | Path = "manifest") -> str:
    """The topology at a glance, for a terminal."""
    arch, n = m.model.architecture, m.model.num_hidden_layers
    pre = "precomputed tables included" if m.rope.precomputed else "no precomputed tables"
    lines = [
        f"{path}  (manifest v{m.schema_version}, built {m.created}, anechain "
        f"{m.versions.get('anechain')})",
        f"model    {n} decoder layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads}/{arch.num_key_value_heads} heads, checkpoint "
        f"{m.model.checkpoint_fingerprint[:12]}",
        f"context  {m.context_length} tokens; RoPE theta {m.rope.rope_theta:g}, rotary_dim "
        f"{m.rope.rotary_dim}, {pre}; mask {m.mask.attended_value:g}/{m.mask.masked_value:g}",
        "",
    ]
    rows = [
        ["layers", "package", "size", "compiled", "functions", "gates", "cosine", "backend"]
        + ["residency"]
    ]
    for s in m.shards:
        v = s.validation
        cosine = v.metrics.get("cosine")
        passed = sum(g.passed for g in v.gates)
        rows.append(
            [
                str(s.layers),
                s.package.path,
                f"{s.package.size_bytes / 1e6:.1f} MB",
                f"{s.compiled.size_bytes / 1e6:.1f} MB" if s.compiled else "-",
                _functions_text(s.functions),
                f"{passed}/{len(v.gates)} {v.verdict}",
                f"{cosine:.5f}" if isinstance(cosine, int | float) else "-",
                v.backend,
                _RESIDENCY_TEXT[v.residency.status],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    unchecked = [str(s.layers) for s in m.shards if s.validation.residency.status != "checked"]
    total = sum(s.package.size_bytes for s in m.shards) / 1e6
    residency = (
        f"not checked on the ANE for {len(unchecked)} of {len(m.shards)} shard(s): "
        f"{', '.join(unchecked)}"
        if unchecked
        else "checked for every shard"
    )
    extra = []
    if m.head is not None:
        h = m.head
        extra.append(
            f"head       {h.package.path}  {h.package.size_bytes / 1e6:.1f} MB, chunks of "
            f"{h.chunk_rows} rows, top-1 agreement "
            f"{h.validation.metrics.get('top1_agreement')}, {h.validation.verdict}"
        )
    if m.embedding is not None:
        e = m.embedding
        extra.append(
            f"embedding  {e.file.path}  {e.dtype} {e.shape[0]} x {e.shape[1]}, "
            f"{e.file.size_bytes / 1e6:.1f} MB"
        )
    return "\n".join(
        [
            *lines,
            *table,
            *extra,
            "",
            f"{len(m.shards)} shards, 0:{n}, {total:.1f} MB; residency {residency}",
        ]
    )
