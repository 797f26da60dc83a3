"""Reading a validation report: every check `report.py`'s module docstring promises.

`read_report` finds a report (or the one beside a package), parses it with `_Parser`, which
raises a one-line ReportError at the first problem, and resolves the package it describes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from anechain.config import Architecture, LayerRange, ResidencySettings, from_dict
from anechain.contract import (
    DECODE_ONLY,
    FUNCTION_DECODE,
    FUNCTION_PREFILL,
    KIND_HEAD,
    KIND_LAYERS,
    IOContract,
    ShardMetadata,
)
from anechain.errors import ConfigError, ReportError
from anechain.jsonio import loads_json
from anechain.report import (
    GATE_SETS,
    REPORT_SCHEMA,
    REPORT_SUFFIX,
    RESIDENCY_STATUSES,
    Gate,
    Golden,
    ValidationReport,
    as_number,
    gate_specs,
    report_path_for,
    residency_gate,
)


def parse_report(data: Any, where: Path | str = "report") -> ValidationReport:
    """A report from its JSON, every gate recomputed; ReportError naming the first problem."""
    return _Parser(data, str(where)).report()


def read_report(source: str | Path, kind: str | None = None) -> tuple[Path, ValidationReport]:
    """(report path, report) for a report file or the package it sits beside.

    The returned report's `package` is resolved against the report's folder (see
    `_package_of`). `kind` (layers | head) refuses a report about another kind of package.
    """
    source = Path(source)
    report = source
    if source.suffix == ".mlpackage":
        report = report_path_for(source)
        if not report.is_file():
            raise ReportError(f"shard {source.name} was never validated: no report at {report}")
    try:
        data = loads_json(report.read_text())
    except OSError as exc:
        raise ReportError(f"cannot read report {report}: {exc.strerror}") from None
    except ValueError as exc:  # not JSON, not UTF-8
        raise ReportError(f"report {report} is not valid JSON ({exc})") from None
    parsed = parse_report(data, report)
    if kind is not None and parsed.kind != kind:
        raise ReportError(f"report {report} is about a {parsed.kind!r} package, not {kind!r}")
    package = _package_of(report, parsed.package, source)
    return report, replace(parsed, package=package)


def _package_of(report: Path, named: Path, source: Path) -> Path:
    """The package a report is about (its sha256 is checked by the reader).

    A package given directly is the one. A report's own path is absolute, or relative to the
    report's folder; failing that, NAME.mlpackage beside NAME.report.json if the report names
    it (`anechain validate shard` may have been given another --report path).
    """
    if source != report:
        if named.name != source.name:
            raise ReportError(f"report {report} describes {named.name}, not {source.name}")
        return source
    package = named if named.is_absolute() else report.parent / named
    beside = report.parent / named.name
    conventional = named.name == report.name.removesuffix(REPORT_SUFFIX) + ".mlpackage"
    return beside if not package.exists() and conventional and beside.exists() else package


# ---- parsing ------------------------------------------------------------------------------

_NONE = type(None)


class _Parser:
    """Reads one report's JSON, raising ReportError at the first problem."""

    def __init__(self, data: Any, where: str) -> None:
        self.data, self.where = data, where

    def fail(self, what: str) -> ReportError:
        return ReportError(f"report {self.where} {what}")

    def get(self, dotted: str, kinds: type | tuple[type, ...]) -> Any:
        value = self.data
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise self.fail(f"is malformed: it has no '{dotted}'")
            value = value[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is _NONE else k.__name__ for k in kinds)
            raise self.fail(f"is malformed: '{dotted}' is not {names}")
        return value

    def report(self) -> ValidationReport:
        if not isinstance(self.data, dict) or self.data.get("schema") != REPORT_SCHEMA:
            found = self.data.get("schema") if isinstance(self.data, dict) else None
            hint = "; validate the shard again" if isinstance(found, str) else ""
            raise self.fail(f"is not an {REPORT_SCHEMA} report (schema {found!r}){hint}")
        kind = self.get("kind", str)
        if kind not in GATE_SETS:
            raise self.fail(f"is about an unknown kind of package {kind!r}")
        meta = self.metadata(kind)
        metrics = self.get("golden.metrics", dict)
        golden = Golden(
            metrics=metrics,
            per_step=self.get("golden.per_step", list),
            first_nonfinite=self.get("golden.first_nonfinite", (dict, _NONE)),
            layer_max_abs=self.layer_max_abs(),
            # Details of a layer shard's run (diagnostics; the gates hold the verdict).
            **{
                key: self.get(f"golden.{key}", kind_)
                for key, kind_ in (("windows", dict), ("kv", list), ("layers", list))
                if key in self.data["golden"]
            },
            next_token=self.next_token(kind, meta),  # before the gates that read it
        )
        return ValidationReport(
            package=Path(self.get("package.path", str)),
            package_sha256=self.get("package.sha256", str),
            size_bytes=self.get("package.size_bytes", int),
            meta=meta,
            backend=self.get("backend", str),
            steps=self.get("steps", int),
            golden=golden,
            prefill=self.prefill(meta.functions),  # before the gates that read it
            long=(long := self.long(kind)),
            gates=self.gates(kind, meta.functions, long is not None),
            residency=self.residency(),
            created=self.get("created", str),
            versions=self.get("versions", dict),
        )

    def metadata(self, kind: str) -> ShardMetadata:
        get = self.get
        try:
            arch = from_dict(Architecture, get("architecture", dict), "architecture")
            contract = IOContract.from_dict(get("contract", dict))
            layers = LayerRange.parse(get("layers", str)) if kind == KIND_LAYERS else None
        except ConfigError as exc:
            raise self.fail(f"is malformed: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise self.fail(f"is malformed: its contract lacks {exc}") from None
        if kind == KIND_HEAD and get("layers", (str, _NONE)) is not None:
            raise self.fail("is malformed: a head report has layers")
        if arch.num_hidden_layers != get("num_hidden_layers", int):
            raise self.fail(
                "is inconsistent: num_hidden_layers differs from architecture.num_hidden_layers"
            )
        extra: dict[str, str] = {}
        rope = get("rope", (dict, _NONE))
        if rope is not None:
            extra["rope"] = json.dumps(rope, sort_keys=True)
        if kind == KIND_HEAD:
            extra["head_chunk_rows"] = str(get("head_chunk_rows", int))
        return ShardMetadata(
            version=str(get("versions", dict).get("anechain", "")),
            kind=kind,
            layers=layers,
            num_hidden_layers=arch.num_hidden_layers,
            checkpoint_fingerprint=get("checkpoint_fingerprint", str),
            weights_fingerprint=get("weights_fingerprint", str),
            quantization=get("quantization", str),
            context_length=get("context_length", int),
            architecture=arch,
            contract=contract,
            extra=extra,
            functions=self.functions(kind),
        )

    def layer_max_abs(self) -> dict[int, float]:
        peaks = self.get("golden.layer_max_abs", dict)
        try:
            return {int(k): float(v) for k, v in peaks.items()}
        except (TypeError, ValueError):
            raise self.fail("is malformed: golden.layer_max_abs is not layer -> number") from None

    def gates(self, kind: str, functions: dict[str, int], long: bool = False) -> tuple[Gate, ...]:
        """The package's mandatory gates, each recomputed; refuses a missing, unknown,
        duplicate, re-defined or inconsistent gate. Stored `passed` flags are never read."""
        specs = {s.name: s for s in gate_specs(kind, functions, long)}
        entries = self.get("gates", list)
        seen: dict[str, Gate] = {}
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise self.fail("is malformed: a gate has no name")
            name = entry["name"]
            spec = specs.get(name)
            if spec is None:
                raise self.fail(f"has an unknown {kind} gate {name!r}")
            if name in seen:
                raise self.fail(f"lists gate {name} twice")
            op, bound = entry.get("op"), as_number(entry.get("bound"))
            if op != spec.op:
                raise self.fail(f"has gate {name} with comparison {op!r}; it is {spec.op!r}")
            if bound is None:
                raise self.fail(f"has gate {name} without a finite numeric bound")
            value = as_number(entry.get("value"))
            measured = spec.value(self.data)
            # Equal, and a metric that is there is a finite number (null: not finite).
            if value != as_number(measured) or (measured is not None and value is None):
                where = " + ".join(f"{src}.{spec.metric}" for src in spec.sources)
                raise self.fail(
                    f"is inconsistent: gate {name} has value {entry.get('value')!r} but "
                    f"{where} is {measured!r}"
                )
            seen[name] = Gate(name, value, bound, op)
        missing = [n for n in specs if n not in seen]
        if missing:
            raise self.fail(f"lacks the mandatory {kind} gate(s) {', '.join(missing)}")
        return tuple(seen[n] for n in specs)

    def functions(self, kind: str) -> dict[str, int]:
        """{"main": 1} (decode only; also when unrecorded) or {"decode": 1, "prefill": T}."""
        value = self.get("functions", (dict, _NONE)) if "functions" in self.data else None
        if value is None or kind == KIND_HEAD:
            return dict(DECODE_ONLY)
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()
        ):
            raise self.fail("is malformed: 'functions' is not name -> tokens")
        if value != DECODE_ONLY and set(value) != {FUNCTION_DECODE, FUNCTION_PREFILL}:
            raise self.fail(f"is malformed: functions {value} are neither main nor decode+prefill")
        return dict(value)

    def prefill(self, functions: dict[str, int]) -> dict[str, Any] | None:
        prefill = self.get("prefill", (dict, _NONE)) if "prefill" in self.data else None
        if FUNCTION_PREFILL in functions and prefill is None:
            raise self.fail("names a prefill function but has no prefill validation")
        return prefill

    def long(self, kind: str) -> dict[str, Any] | None:
        """The long window (validate_long), or None; its gates are then mandatory, and
        whether a config needs one is manifest build's question (`check_long`)."""
        long = self.get("long", (dict, _NONE)) if "long" in self.data else None
        if long is not None and kind != KIND_LAYERS:
            raise self.fail("is malformed: a head report has a long window")
        if long is not None:
            for key in ("prompt", "decode_steps"):
                value = self.get(f"long.{key}", int)
                if value < (1 if key == "decode_steps" else 0):
                    raise self.fail(f"is malformed: long.{key} is {value}")
        return long

    # ---- next-token verdicts (issue 17.4) ----

    def next_token(self, kind: str, meta: ShardMetadata) -> dict[str, Any] | None:
        """A layer shard's next-token verdict, its figures recomputed from its per-position
        records and the shard's layer share: a forged mean, worst, agreement or flip list
        is refused (nexttoken.assemble is what validation wrote them with)."""
        from anechain.nexttoken import assemble

        if kind != KIND_LAYERS:
            return None
        block = self.get("golden.next_token", dict)
        records = self.get("golden.next_token.per_position", list)
        for r in records:
            if not (
                isinstance(r, dict)
                and isinstance(r.get("window"), str)
                and all(_is_int(r.get(k)) for k in ("position", "expected", "token"))
                and as_number(r.get("margin")) is not None
                and (r.get("kl") is None or (as_number(r["kl"]) or 0.0) >= 0.0)
                and (r.get("kl") is None or as_number(r["kl"]) is not None)
            ):
                raise self.fail(f"is malformed: a next-token record is not one position: {r!r}")
        assert meta.layers is not None  # a layer report has them
        recomputed = assemble(records, meta.layers.num_layers / meta.num_hidden_layers)
        for key in ("metrics", "windows"):
            if block.get(key) != recomputed[key]:
                raise self.fail(
                    f"is inconsistent: golden.next_token.{key} differs from its per-position "
                    f"records ({recomputed[key] if key == 'metrics' else 'per window'})"
                )
        return block

    def residency(self) -> dict[str, Any]:
        residency = self.get("residency", dict)
        status = self.get("residency.status", str)
        if status not in RESIDENCY_STATUSES:
            raise self.fail(f"has an unknown residency status {status!r}")
        self.get("residency.passed", (bool, _NONE))
        counts = self.get("residency.counts", (dict, _NONE))
        unreported = residency.get("unreported_functions") or []
        if status == "checked" and counts is None and not unreported:
            raise self.fail("is malformed: residency was checked but has no counts")
        _check_match(residency, self)
        # Like a gate's, the residency verdict is recomputed from its evidence, the counts.
        passed = _residency_passes(residency, self) if status == "checked" else None
        return {**residency, "passed": passed}


def _check_match(residency: dict[str, Any], parser: _Parser) -> None:
    """A plan replayed from a file or a capture is matched with its program exactly; a report
    of such a plan claiming a lenient match (ops the compiler changed) is forged or stale."""
    source = str(residency.get("plan_source", ""))
    if source in ("", "live"):
        return
    functions = residency.get("functions")
    parts = [residency, *(functions.values() if isinstance(functions, dict) else [])]
    for part in parts:
        match = part.get("match") if isinstance(part, dict) else None
        if match is None:
            continue  # reports from before the lenient match
        if not isinstance(match, dict):
            raise parser.fail("is malformed: residency.match is not an object")
        changed = any(match.get(k) for k in ("renamed", "added", "removed"))
        if match.get("mode") != "strict" or changed:
            raise parser.fail(
                f"claims a lenient plan/program match for a replayed plan ({source}); "
                "replayed plans must match their program exactly"
            )


def _residency_passes(residency: dict[str, Any], parser: _Parser) -> bool:
    """Recompute the residency gate (residency.gate_failures) from its evidence: the counts and
    the plumbing share, of each function when the package records them per function (a
    package passes only if every function does), else of the package."""
    from anechain.residency import ResidencyCounts
    from anechain.residency.gate import gate_failures

    gate = residency.get("gate")
    settings = residency_gate(gate) if gate is not None else ResidencySettings()
    if settings is None:
        raise parser.fail("is malformed: residency.gate is not a residency gate")
    functions = residency.get("functions")
    if functions is not None and not (isinstance(functions, dict) and functions):
        raise parser.fail("is malformed: residency.functions is not function -> counts")
    parts = list(functions.values()) if functions else [residency]
    for part in parts:
        if not isinstance(part, dict) or part.get("counts") is None:
            # Core ML reported no device usage: unproven, never a pass (residency.gate).
            return False
        plumbing = part.get("plumbing") if isinstance(part, dict) else None
        plumbing = plumbing if isinstance(plumbing, dict) else {}
        share = as_number(plumbing.get("share_off_ane", 0.0))
        if share is None:
            raise parser.fail("is malformed: residency plumbing share_off_ane is not a number")
        try:
            counts = ResidencyCounts(**{k: int(v) for k, v in part["counts"].items()})
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise parser.fail(f"is malformed: residency counts ({exc})") from None
        if gate_failures(counts, share, str(plumbing.get("basis", "")), settings):
            return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
