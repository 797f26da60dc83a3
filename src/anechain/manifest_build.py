"""`manifest build`: a manifest from validation reports, never from a Core ML model.

Each report is read through `report.read_report`, which recomputes every gate from its
evidence and requires the kind's mandatory gates; here a shard must also have passed, been
held to bounds at least as strict as the config's (recorded in the manifest), be unchanged
since validation, share one I/O contract and tile the model's layers. The JSON (sorted keys,
2-space indent) is written atomically beside the shards.

A shard's report is found beside its package: `layers_0_8.mlpackage` -> `layers_0_8.report.json`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from anechain import __version__
from anechain.config import Architecture, Gates, ResidencySettings, ValidationSettings, to_dict
from anechain.contract import KIND_HEAD, KIND_LAYERS
from anechain.errors import ManifestError
from anechain.fsutil import atomic_write_text, sha256_tree
from anechain.manifest import (
    SCHEMA_VERSION,
    EmbeddingEntry,
    FileRef,
    Gate,
    HeadEntry,
    Manifest,
    Mask,
    Model,
    Residency,
    Rope,
    ShardEntry,
    StepIO,
    TokenizerEntry,
    Validation,
    load_embedding_table,
    schema_check,
)
from anechain.report import ValidationReport, as_number
from anechain.report_read import read_report
from anechain.shards import (
    ShardRecord,
    architecture_problems,
    check_topology,
    relative_inside,
    shard_record,
)


def _file_ref(path: Path, root: Path, what: str, digest: str | None = None) -> FileRef:
    rel = relative_inside(path, root, what)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return FileRef(rel, digest or sha256_tree(path), sum(f.stat().st_size for f in files))


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"anechain": __version__}
    for dist in ("coremltools", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def validation_summary(report: ValidationReport) -> Validation:
    """The manifest's `validation` object: the recomputed gates, never the stored flags."""
    r = report.residency
    return Validation(
        verdict=report.verdict,
        backend=report.backend,
        steps=report.steps,
        gates=tuple(Gate(g.name, g.value, g.bound, g.op, g.passed) for g in report.gates),
        # The scalar figures (per-layer or per-step detail stays in the report).
        metrics={
            k: v if isinstance(v, int) else as_number(v)
            for k, v in report.golden.metrics.items()
            if _scalar(v)
        },
        residency=Residency(r["status"], report.residency_passed, r.get("counts")),
        created=report.created,
        versions=dict(report.versions),
    )


def _scalar(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _read(
    source: Path,
    gates: Gates,
    residency: ResidencySettings | None,
    validation: ValidationSettings | None = None,
) -> tuple[Path, ValidationReport]:
    """A report that passed, with bounds at least as strict as `gates` (and `residency`),
    and the long window `validation` requires."""
    path, report = read_report(source)
    report.require_pass(path)
    report.check_bounds(gates, path, residency)
    report.check_windows(validation or ValidationSettings(), path)
    return path, report


def build_manifest(
    reports: list[Path],
    out: Path,
    overwrite: bool = False,
    rope: dict[str, Any] | None = None,
    embedding: Path | None = None,
    gates: Gates | None = None,
    residency: ResidencySettings | None = None,
    validation: ValidationSettings | None = None,
    tokenizer: Path | None = None,
) -> Manifest:
    """Check validated shards and write their manifest to `out` atomically.

    Args:
        reports: validation reports, or shard packages whose report sits beside them
            (<name>.report.json beside <name>.mlpackage), in any order.
            A head's report (or the head package) may be among them.
        rope: host-side RoPE data (rope.RopeParameters.to_dict()), kept as rope.precomputed;
            by default the one the exporter recorded in the shards' reports.
        embedding: the fp16 token table (.npy) the host gathers from.
        gates: the bounds every report's gates must meet or beat (default: config.Gates());
            recorded in the manifest.
        residency: the residency gate a counted plan must have been judged by, or a stricter
            one (default: config.ResidencySettings(), strict).
        validation: whose long window (the runtime's run) every layer report must have run,
            at least as long (default: config.ValidationSettings(), the context minus its
            decode steps); its `gates` are not read (`gates` are).
        tokenizer: the checkpoint folder whose tokenizer files are copied into `tokenizer/`
            beside the manifest and listed in it (a folder without a tokenizer: none).
    """
    out = Path(out)
    gates = gates or Gates()
    residency = residency or ResidencySettings()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ManifestError(f"{out} already exists; pass --overwrite to replace it")
    if not reports:
        raise ManifestError("no shards given: pass validation reports or shard packages")
    read = [_read(Path(src), gates, residency, validation) for src in reports]
    heads = [(p, r) for p, r in read if r.kind == KIND_HEAD]
    if len(heads) > 1:
        raise ManifestError(f"{len(heads)} heads given ({heads[0][0]}, {heads[1][0]})")
    shards = [(p, r, shard_record(r)) for p, r in read if r.kind == KIND_LAYERS]
    if not shards:
        raise ManifestError("no layer shards given: pass their validation reports or packages")
    seen: dict[Path, Path] = {}
    for p, r, rec in shards:
        if (prev := seen.setdefault(r.package.resolve(), p)) is not p:
            raise ManifestError(f"shard {rec.label} is given twice (reports {prev} and {p})")
    if len({rec.name for _, _, rec in shards}) < len(shards):
        # The same file name in different folders: tell the shards apart by path.
        shards = [(p, r, replace(rec, name=str(r.package))) for p, r, rec in shards]
    check_topology([rec for _, _, rec in shards])
    shards.sort(key=lambda s: s[2].layers.start)
    problems = architecture_problems([(rec, r.meta.architecture) for _, r, rec in shards])
    if problems:
        raise ManifestError(problems[0])

    root = out.parent
    entries = []
    for p, r, rec in shards:
        what = f"shard {rec.label}"
        digest = _validated_digest(r, p, root, what)
        entries.append(
            ShardEntry(
                rec.layers.start,
                rec.layers.end,
                _file_ref(r.package, root, f"{what} package", digest),
                _compiled_ref(r.package, digest, root, what),
                r.meta.weights_fingerprint,
                rec.contract.states,
                validation_summary(r),
                dict(r.meta.functions),
            )
        )

    first, rec = shards[0][1], shards[0][2]
    arch = first.meta.architecture
    if rope is None:
        # Every shard was exported from one checkpoint (checked above): take its RoPE data.
        ropes = [r.rope for _, r, _ in shards if r.rope is not None]
        if ropes and any(x != ropes[0] for x in ropes):
            raise ManifestError("shards disagree on their RoPE parameters; export them again")
        rope = ropes[0] if ropes else None
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        versions=_versions(),
        model=Model(arch, arch.num_hidden_layers, rec.checkpoint_fingerprint),
        context_length=rec.context_length,
        rope=Rope(**{k: getattr(arch, k) for k in Rope.FROM_ARCHITECTURE}, precomputed=rope),
        mask=Mask(),
        contract=StepIO(rec.contract.inputs, rec.contract.outputs),
        gates=to_dict(gates),
        shards=tuple(entries),
        embedding=_embedding_entry(embedding, arch, root) if embedding else None,
        head=_head_entry(*heads[0], rec, root) if heads else None,
        tokenizer=_tokenizer_entry(tokenizer, arch, root) if tokenizer else None,
    )
    schema_check(manifest.to_dict(), out)  # what we write must load
    try:
        atomic_write_text(out, manifest.to_json(), overwrite=overwrite)
    except FileExistsError:
        raise ManifestError(f"{out} already exists; pass --overwrite to replace it") from None
    return manifest


def _validated_digest(report: ValidationReport, path: Path, root: Path, what: str) -> str:
    """The package's sha256, refusing one outside `root`, missing, or not the one validated."""
    relative_inside(report.package, root, f"{what} package")
    if not report.package.is_dir():
        raise ManifestError(f"{what}: package {report.package} does not exist (report {path})")
    digest = sha256_tree(report.package)
    if digest != report.package_sha256:
        raise ManifestError(
            f"{what} changed after validation: sha256 {digest[:12]} now, "
            f"{report.package_sha256[:12]} in report {path}; validate it again"
        )
    return digest


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


def _head_entry(path: Path, head: ValidationReport, rec: ShardRecord, root: Path) -> HeadEntry:
    what = f"head {head.package.name}"
    if head.meta.checkpoint_fingerprint != rec.checkpoint_fingerprint:
        raise ManifestError(f"{what} comes from another checkpoint than shard {rec.label}")
    hidden = [i for i in head.meta.contract.inputs if i.name == "hidden_states"]
    out = [o for o in rec.contract.outputs if o.name == "output_hidden_states"]
    if not hidden or not out or hidden[0].shape != out[0].shape:
        raise ManifestError(f"{what} does not take the shards' output_hidden_states shape")
    digest = _validated_digest(head, path, root, what)
    return HeadEntry(
        _file_ref(head.package, root, f"{what} package", digest),
        _compiled_ref(head.package, digest, root, what),
        head.meta.weights_fingerprint,
        int(head.head_chunk_rows or 0),
        StepIO(head.meta.contract.inputs, head.meta.contract.outputs),
        validation_summary(head),
    )


def _embedding_entry(path: Path, arch: Architecture, root: Path) -> EmbeddingEntry:
    want = (arch.vocab_size, arch.hidden_size)
    load_embedding_table(path, want)
    return EmbeddingEntry(_file_ref(path, root, "embedding"), want, "float16")


def _tokenizer_entry(checkpoint_dir: Path, arch: Architecture, root: Path) -> TokenizerEntry | None:
    from anechain.tokenizer import (
        TOKENIZER_FOLDER,
        copy_tokenizer,
        eos_token_ids,
        load_tokenizer,
        tokenizer_files,
    )

    if not tokenizer_files(Path(checkpoint_dir)):
        return None
    # Checked before anything is copied: another model's tokenizer loads fine and encodes
    # prompts into ids the embedding does not have. (A smaller one is normal: the model's
    # vocabulary is often padded, Phi-4-mini's to 200064.)
    size = len(load_tokenizer(Path(checkpoint_dir)))
    if size > arch.vocab_size:
        raise ManifestError(
            f"the tokenizer of {checkpoint_dir} has {size} tokens but the model's vocabulary "
            f"has {arch.vocab_size}: it belongs to another model"
        )
    copied = copy_tokenizer(Path(checkpoint_dir), root / TOKENIZER_FOLDER)
    eos = eos_token_ids(Path(checkpoint_dir))
    own = load_tokenizer(root / TOKENIZER_FOLDER).eos_token_id  # also proves it loads
    eos += [own] if isinstance(own, int) and own not in eos else []
    outside = [i for i in eos if not 0 <= i < arch.vocab_size]
    if outside:
        raise ManifestError(
            f"eos token id {outside[0]} of {checkpoint_dir} is outside the vocabulary "
            f"({arch.vocab_size})"
        )
    return TokenizerEntry(tuple(_file_ref(p, root, "tokenizer") for p in copied), tuple(eos))
