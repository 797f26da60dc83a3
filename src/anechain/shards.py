"""A set of layer shards: whether they chain into one model.

The chain checks (`topology_problems`, `check_topology`, `coverage_problems`) are pure
functions over plain records (ranges, fingerprints, I/O contracts): no files, no hashing, so
a `plan` command can use them before anything is exported. Every problem is one line naming
the shards involved. `shard_record` makes a record of a validation report (report.py);
`relative_inside` and `check_manifest_path` keep the manifest's paths inside its folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from anechain.config import Architecture, LayerRange, to_dict
from anechain.contract import IOContract, layer_contract
from anechain.errors import ManifestError

if TYPE_CHECKING:
    from anechain.report import ValidationReport


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


def shard_record(report: ValidationReport, name: str | None = None) -> ShardRecord:
    """A layer shard's validation report as a topology record."""
    m = report.meta
    if m.layers is None:
        raise ManifestError(f"{report.package.name} is a head, not a layer shard")
    return ShardRecord(
        name or report.package.name,
        m.layers,
        m.num_hidden_layers,
        m.checkpoint_fingerprint,
        m.contract,
        m.context_length,
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
