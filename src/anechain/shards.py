"""A set of layer shards: whether they chain into one model, and what their reports say.

The chain checks (`topology_problems`, `check_topology`, `coverage_problems`) are pure
functions over plain records (ranges, fingerprints, I/O contracts): no files, no hashing, so
a `plan` command can use them before anything is exported. Every problem is one line naming
the shards involved. `read_shard_report` reads a validation report (format in DESIGN.md) and
refuses a shard that did not pass; `relative_inside` and `check_manifest_path` keep the
manifest's paths inside its folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from anechain.config import Architecture, LayerRange, from_dict, to_dict
from anechain.contract import KIND_HEAD, KIND_LAYERS, IOContract, layer_contract
from anechain.errors import ConfigError, ManifestError


@dataclass(frozen=True)
class ShardRecord:
    """What the topology checks need to know about one shard."""

    name: str  # how messages refer to the shard, e.g. "layers_8_16.mlpackage"
    layers: LayerRange
    num_hidden_layers: int
    checkpoint_fingerprint: str
    contract: IOContract
    context_length: int

    @property
    def label(self) -> str:
        return f"{self.name} ({self.layers})"


def coverage_problems(
    ranges: Sequence[tuple[str, LayerRange]], num_hidden_layers: int
) -> list[str]:
    """Problems with named ranges that must tile [0, num_hidden_layers) exactly, in order."""
    if not ranges:
        return ["no shards given"]
    items = sorted(ranges, key=lambda item: (item[1].start, item[1].end, item[0]))
    problems = []
    first_name, first = items[0]
    if first.start != 0:
        problems.append(
            f"layers 0:{first.start} are in no shard (the first, {first_name} ({first}), "
            f"starts at {first.start})"
        )
    # Compare each range with the furthest-reaching one before it, so a range nested in an
    # earlier one is an overlap and never hides a gap.
    prev_name, prev = items[0]
    for name, r in items[1:]:
        if r == prev:
            problems.append(f"{prev_name} and {name} both hold layers {r} (duplicate range)")
        elif r.start < prev.end:
            problems.append(
                f"{prev_name} ({prev}) and {name} ({r}) overlap at layers "
                f"{r.start}:{min(prev.end, r.end)}"
            )
        elif r.start > prev.end:
            problems.append(
                f"layers {prev.end}:{r.start} are in no shard (gap between {prev_name} "
                f"({prev}) and {name} ({r}))"
            )
        if r.end > prev.end:
            prev_name, prev = name, r
    last_name, last = prev_name, prev
    if last.end < num_hidden_layers:
        problems.append(
            f"layers {last.end}:{num_hidden_layers} are in no shard (the last, {last_name} "
            f"({last}), ends at {last.end} of {num_hidden_layers})"
        )
    elif last.end > num_hidden_layers:
        problems.append(
            f"{last_name} ({last}) ends past the model's {num_hidden_layers} decoder layers"
        )
    return problems


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two JSON-like values first differ, e.g. 'inputs.attention_mask.shape'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{where}.{key}".lstrip("."))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for x, y in zip(a, b, strict=True):
            if x != y:
                same = (
                    isinstance(x, dict) and isinstance(y, dict) and x.get("name") == y.get("name")
                )
                label = x["name"] if same and "name" in x else None
                return first_difference(x, y, f"{where}.{label}" if label else where)
    return f"{where or 'value'} {a!r} vs {b!r}"


def contract_problems(record: ShardRecord) -> list[str]:
    """Problems within one shard: its states must hold exactly its range's layers."""
    return [
        f"{record.label} has state {s.name} for {s.shape[0] if s.shape else 0} layers, "
        f"its range holds {record.layers.num_layers}"
        for s in record.contract.states
        if not s.shape or s.shape[0] != record.layers.num_layers
    ]


def topology_problems(records: Sequence[ShardRecord]) -> list[str]:
    """Every reason these shards do not chain into one model; empty when they do."""
    if not records:
        return ["no shards given"]
    ordered = sorted(records, key=lambda r: (r.layers.start, r.layers.end, r.name))
    ref = ordered[0]
    problems: list[str] = []
    for r in ordered[1:]:
        if r.checkpoint_fingerprint != ref.checkpoint_fingerprint:
            problems.append(
                f"{r.label} is from another checkpoint than {ref.label} (fingerprint "
                f"{r.checkpoint_fingerprint[:12]} vs {ref.checkpoint_fingerprint[:12]})"
            )
        elif r.num_hidden_layers != ref.num_hidden_layers:
            problems.append(
                f"{r.label} says the model has {r.num_hidden_layers} decoder layers, "
                f"{ref.label} says {ref.num_hidden_layers}"
            )
    for r in ordered[1:]:
        if r.context_length != ref.context_length:
            problems.append(
                f"{r.label} has context length {r.context_length}, {ref.label} has "
                f"{ref.context_length}"
            )
        elif r.contract.chain_key() != ref.contract.chain_key():
            diff = first_difference(r.contract.chain_key(), ref.contract.chain_key())
            problems.append(f"{r.label} has another I/O contract than {ref.label}: {diff}")
    for r in ordered:
        problems += contract_problems(r)
    problems += coverage_problems([(r.name, r.layers) for r in ordered], ref.num_hidden_layers)
    return problems


def architecture_problems(shards: Sequence[tuple[ShardRecord, Architecture]]) -> list[str]:
    """Shards must share one architecture, and their contract must agree with it (a runtime
    builds cos/sin and the mask from the architecture and the context length)."""
    problems = []
    ref, ref_arch = shards[0]
    for r, arch in shards[1:]:
        if arch != ref_arch:
            diff = first_difference(to_dict(arch), to_dict(ref_arch))
            problems.append(f"{r.label} has other architecture numbers than {ref.label}: {diff}")
    expected = layer_contract(ref_arch, ref.context_length, ref.layers.num_layers).chain_key()
    if ref.contract.chain_key() != expected:
        diff = first_difference(ref.contract.chain_key(), expected)
        problems.append(
            f"{ref.label}'s I/O contract does not match its architecture and context length: {diff}"
        )
    return problems


def check_topology(records: Sequence[ShardRecord]) -> list[ShardRecord]:
    """The records in layer order, or ManifestError naming the first problem."""
    problems = topology_problems(records)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ManifestError(f"shards do not chain: {problems[0]}{more}")
    return sorted(records, key=lambda r: r.layers.start)


# ---- reading validation reports -------------------------------------------------------------

REPORT_SCHEMA = "anechain.validation-report/1"
REPORT_SUFFIX = ".report.json"
RESIDENCY_STATUSES = ("checked", "report_only", "not_checked")
NONE = type(None)


@dataclass(frozen=True)
class ValidatedShard:
    """A shard whose report says it passed every gate (not yet checked against its files)."""

    report: Path
    package: Path  # as the report names it, relative to the report's folder
    record: ShardRecord
    architecture: Architecture
    weights_fingerprint: str
    validated_sha256: str  # sha256_tree of the package when it was validated
    # verdict, backend, steps, gates, metrics, residency {status, passed, counts}, created,
    # versions: the manifest's `validation` object
    summary: dict[str, Any]
    # Host-side RoPE data the exporter recorded (rope.RopeParameters.to_dict()), if any.
    rope: dict[str, Any] | None = None
    # The package's functions (contract.ShardMetadata.functions); decode only if unrecorded.
    functions: dict[str, int] | None = None


def report_path_for(package: str | Path) -> Path:
    """Where a package's validation report lives: <name>.report.json beside <name>.mlpackage."""
    package = Path(package)
    return package.with_name(package.stem + REPORT_SUFFIX)


def _get(data: Any, dotted: str, kinds: type | tuple[type, ...], where: Path) -> Any:
    value = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ManifestError(f"report {where} is malformed: it has no '{dotted}'")
        value = value[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ManifestError(f"report {where} is malformed: '{dotted}' is not {names}")
    return value


def _package_of(report: Path, named: Path, source: Path) -> Path:
    """The package a report is about (its sha256 is checked later, so identity is certain).

    A package given directly is the one. A report's own path is absolute, or relative to the
    report's folder; failing that, NAME.mlpackage beside NAME.report.json if the report names
    it (`anechain validate shard` writes the path relative to its working directory).
    """
    if source is not report:
        if named.name != source.name:
            raise ManifestError(f"report {report} describes {named.name}, not {source.name}")
        return source
    package = named if named.is_absolute() else report.parent / named
    beside = report.parent / named.name
    conventional = named.name == report.name.removesuffix(REPORT_SUFFIX) + ".mlpackage"
    return beside if not package.exists() and conventional and beside.exists() else package


def _open_report(source: Path) -> tuple[Path, dict[str, Any]]:
    """(report path, its JSON) for a report or for the package it sits beside."""
    report = source
    if source.suffix == ".mlpackage":
        report = report_path_for(source)
        if not report.is_file():
            raise ManifestError(f"shard {source.name} was never validated: no report at {report}")
    try:
        data = json.loads(report.read_text())
    except OSError as exc:
        raise ManifestError(f"cannot read report {report}: {exc.strerror}") from None
    except ValueError as exc:
        raise ManifestError(f"report {report} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise ManifestError(f"report {report} is not an {REPORT_SCHEMA} report")
    return report, data


def report_kind(source: Path) -> str:
    """`layers` or `head`: what the report (or the package's report) is about."""
    report, data = _open_report(source)
    return str(_get(data, "kind", str, report))


def _passed_summary(data: dict[str, Any], report: Path, label: str) -> dict[str, Any]:
    """The manifest's `validation` object; refuses a report whose shard did not pass."""

    def get(key: str, kinds: type | tuple[type, ...]) -> Any:
        return _get(data, key, kinds, report)

    if get("residency.status", str) not in RESIDENCY_STATUSES:
        raise ManifestError(
            f"report {report} has an unknown residency status {data['residency']['status']!r}"
        )
    try:
        gates = [
            {k: g[k] for k in ("name", "value", "bound", "op")} | {"passed": g["passed"] is True}
            for g in get("gates", list)
        ]
    except (KeyError, TypeError):
        raise ManifestError(
            f"report {report} is malformed: a gate lacks name, value, bound, op or passed"
        ) from None
    residency = {
        "status": get("residency.status", str),
        "passed": get("residency.passed", (bool, NONE)),
        "counts": get("residency.counts", (dict, NONE)),
    }
    verdict = get("verdict", str)
    failed = [g["name"] for g in gates if not g["passed"]]
    if residency["passed"] is False and "residency" not in failed:
        failed.append("residency")
    if get("golden.passed", bool) is False and not failed:
        failed.append("golden")
    if verdict != "pass":
        raise ManifestError(
            f"shard {label} failed validation: gate(s) "
            f"{', '.join(failed) or '(none named)'} failed (report {report})"
        )
    if failed:
        raise ManifestError(
            f"shard {label}: report {report} says pass but gate(s) "
            f"{', '.join(failed)} failed; validate the shard again"
        )
    return {
        "verdict": verdict,
        "backend": get("backend", str),
        "steps": get("steps", int),
        "gates": gates,
        "metrics": get("golden.metrics", dict),
        "residency": residency,
        "created": get("created", str),
        "versions": get("versions", dict),
    }


def _common(
    source: Path, kind: str
) -> tuple[Path, dict[str, Any], Path, Architecture, IOContract, Any]:
    report, data = _open_report(source)

    def get(key: str, kinds: type | tuple[type, ...]) -> Any:
        return _get(data, key, kinds, report)

    if get("kind", str) != kind:
        raise ManifestError(f"report {report} is about a {data['kind']!r} package, not {kind!r}")
    package = _package_of(report, Path(get("package.path", str)), source)
    try:
        arch = from_dict(Architecture, get("architecture", dict), "architecture")
        contract = IOContract.from_dict(get("contract", dict))
    except ConfigError as exc:
        raise ManifestError(f"report {report} is malformed: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"report {report} is malformed: contract lacks {exc}") from None
    if arch.num_hidden_layers != get("num_hidden_layers", int):
        raise ManifestError(
            f"report {report} is inconsistent: num_hidden_layers differs from "
            f"architecture.num_hidden_layers"
        )
    return report, data, package, arch, contract, get


def read_shard_report(source: Path) -> ValidatedShard:
    """Read a layer shard's report (or the report beside it); refuse a shard that did not pass."""
    report, data, package, arch, contract, get = _common(source, KIND_LAYERS)
    try:
        layers = LayerRange.parse(get("layers", str))
    except ConfigError as exc:
        raise ManifestError(f"report {report} is malformed: {exc}") from None
    summary = _passed_summary(data, report, f"{package.name} ({layers})")
    record = ShardRecord(
        package.name,
        layers,
        arch.num_hidden_layers,
        get("checkpoint_fingerprint", str),
        contract,
        get("context_length", int),
    )
    return ValidatedShard(
        report,
        package,
        record,
        arch,
        get("weights_fingerprint", str),
        get("package.sha256", str),
        summary,
        data.get("rope") if isinstance(data.get("rope"), dict) else None,
        _functions(data, report),
    )


def _functions(data: dict[str, Any], report: Path) -> dict[str, int] | None:
    """The report's `functions` ({"main": 1} or {"decode": 1, "prefill": T}), if recorded."""
    value = data.get("functions")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()
    ):
        raise ManifestError(f"report {report} is malformed: 'functions' is not name -> tokens")
    if "prefill" in value and not isinstance(data.get("prefill"), dict):
        raise ManifestError(
            f"report {report} names a prefill function but has no prefill validation"
        )
    return dict(value)


@dataclass(frozen=True)
class ValidatedHead:
    """The final norm + LM head package, whose report says it passed."""

    report: Path
    package: Path
    architecture: Architecture
    checkpoint_fingerprint: str
    weights_fingerprint: str
    validated_sha256: str
    contract: IOContract
    chunk_rows: int
    summary: dict[str, Any]


def read_head_report(source: Path) -> ValidatedHead:
    """Read the head's report (or the report beside it); refuse a head that did not pass."""
    report, data, package, arch, contract, get = _common(source, KIND_HEAD)
    return ValidatedHead(
        report,
        package,
        arch,
        get("checkpoint_fingerprint", str),
        get("weights_fingerprint", str),
        get("package.sha256", str),
        contract,
        get("head_chunk_rows", int),
        _passed_summary(data, report, f"{package.name} (head)"),
    )


# ---- where shard files may live: inside the manifest's folder ------------------------------


def relative_inside(path: Path, root: Path, what: str) -> str:
    """`path` relative to `root` (POSIX), refusing anything that resolves outside root."""
    root_real = root.resolve()
    candidate = path.parent.resolve() / path.name
    if not candidate.is_relative_to(root_real) or candidate == root_real:
        raise ManifestError(
            f"{what} {path} is outside the manifest's folder {root}; a manifest "
            f"only references files in its own folder"
        )
    if not candidate.resolve().is_relative_to(root_real):
        raise ManifestError(
            f"{what} {path} is a symlink resolving outside the manifest's folder {root}"
        )
    return candidate.relative_to(root_real).as_posix()


def check_manifest_path(rel: str, root: Path, where: str) -> Path:
    """A path read from a manifest: relative, without '..', resolving inside `root`."""
    win = PureWindowsPath(rel)
    if "\\" in rel or PurePosixPath(rel).is_absolute() or win.is_absolute() or win.drive:
        raise ManifestError(
            f"{where} path {rel!r} must be relative to the manifest, with / separators"
        )
    if ".." in PurePosixPath(rel).parts:
        raise ManifestError(f"{where} path {rel!r} escapes the manifest's folder ('..')")
    if not (root / rel).resolve().is_relative_to(root.resolve()):
        raise ManifestError(f"{where} path {rel!r} resolves outside the manifest's folder")
    return root / rel
