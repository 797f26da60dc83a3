"""The validation report: one typed class, written by `validate`, read by `manifest`, `build`,
`plan` and the tests (format in DESIGN.md).

A report is evidence, not a vote. Reading one never trusts its `passed` or `verdict` fields:
every gate's verdict is recomputed from its value, bound and comparison; each gate's value
must be the metric it gates (`golden.metrics`); the kind's mandatory gates must all be there
with the comparison they are defined with; and `check_bounds` refuses bounds looser than the
config a reader applies. Every problem is a one-line ReportError naming the report.
Reading lives in report_read.py (`read_report`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from anechain import __version__
from anechain.config import (
    Gates,
    LayerRange,
    ResidencySettings,
    ValidationSettings,
    from_dict,
    to_dict,
)
from anechain.contract import KIND_HEAD, KIND_LAYERS, ShardMetadata
from anechain.errors import ConfigError, ReportError
from anechain.jsonio import atomic_write_json

REPORT_SCHEMA = "anechain.validation-report/2"
REPORT_SUFFIX = ".report.json"
RESIDENCY_STATUSES = ("checked", "report_only", "not_checked")

OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


# ---- gates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSpec:
    """A gate: `metric op bound`, the metric read from the report's evidence (`golden.metrics`
    by default; a count summed over several sources), the bound from config.Gates."""

    name: str
    metric: str  # key in each source
    bound_field: str | None  # field of config.Gates; None: the bound is always 0
    op: str  # ">=" (higher is better) or "<="
    sources: tuple[str, ...] = ("golden.metrics",)  # dotted paths in the report's JSON

    def value(self, evidence: Mapping[str, Any]) -> Any:
        """The metric in `evidence` (the report's JSON, or the parts of it the sources name);
        None if a source or the metric is missing or not finite."""
        values = []
        for source in self.sources:
            node: Any = evidence
            for key in source.split("."):
                node = node.get(key) if isinstance(node, Mapping) else None
            values.append(node.get(self.metric) if isinstance(node, Mapping) else None)
        if len(values) == 1:
            return values[0]
        numbers = [as_number(v) for v in values]
        return None if any(v is None for v in numbers) else sum(numbers)  # type: ignore[arg-type]

    def bound(self, gates: Gates) -> float:
        return 0.0 if self.bound_field is None else float(getattr(gates, self.bound_field))

    def looser(self, bound: float, required: float) -> bool:
        """Would `bound` let through a value that `required` rejects?"""
        return bound < required if self.op == ">=" else bound > required


# The mandatory gates of each kind, in report order; a report must hold exactly these.
# New gates (KV cache, per layer) are added here, and every reader then requires them.
# The output gates: what any run of a shard's outputs against the reference is held to.
OUTPUT_GATES: tuple[GateSpec, ...] = (
    GateSpec("finite", "nonfinite", None, "<="),
    GateSpec("cosine", "cosine", "min_cosine", ">="),
    # The skip connection hides a lost layer from the output cosine, not from the delta's.
    GateSpec("delta_cosine", "delta_cosine", "min_delta_cosine", ">="),
    # Relative to the reference's RMS, per step: hidden states grow through the model.
    GateSpec("rmse", "rel_rmse", "max_rel_rmse", "<="),
    GateSpec("max_abs", "rel_max_abs", "max_rel_abs", "<="),
)
# A layer shard's decode run: the output gates, plus the steps, layers and KV cache.
LAYER_GATES: tuple[GateSpec, ...] = (
    *OUTPUT_GATES,
    # The worst single step's delta: one large step (a massive activation) dominates the
    # whole-run cosines.
    GateSpec("step_delta_cosine", "step_delta_cosine", "min_step_delta_cosine", ">="),
    # Each layer's own delta inside the shard (mil); the shard's for runners without layer
    # outputs (Core ML).
    GateSpec("layer_delta_cosine", "layer_delta_cosine", "min_delta_cosine", ">="),
    # The KV cache read back from the state: transformers' cache where written, worst
    # layer; exactly zero where nothing was written.
    GateSpec("kv_cosine", "kv_cosine", "min_kv_cosine", ">="),
    GateSpec("kv_unwritten", "kv_unwritten_max_abs", None, "<="),
)
HEAD_GATES: tuple[GateSpec, ...] = (
    GateSpec("finite", "nonfinite", None, "<="),
    GateSpec("top1_agreement", "top1_agreement", "min_top1_agreement", ">="),
    # A flipped token only between near-ties (reference logit gap, in logit std units).
    GateSpec("top1_margin", "worst_margin", "max_top1_margin", "<="),
    GateSpec("logit_cosine", "cosine", "min_cosine", ">="),
)
GATE_SETS: dict[str, tuple[GateSpec, ...]] = {KIND_LAYERS: LAYER_GATES, KIND_HEAD: HEAD_GATES}


def _prefixed(specs: tuple[GateSpec, ...], prefix: str, source: str) -> tuple[GateSpec, ...]:
    return tuple(GateSpec(prefix + s.name, s.metric, s.bound_field, s.op, (source,)) for s in specs)


# A two-function package (validate_prefill): its prefill outputs, the KV states prefill wrote,
# and decode continuing from them, each held to the output gates (prefill's KV has its own).
PREFILL_GATES: tuple[GateSpec, ...] = (
    *_prefixed(OUTPUT_GATES, "prefill_", "prefill.metrics"),
    GateSpec(
        "prefill_kv_finite", "nonfinite", None, "<=", ("prefill.kv.keys", "prefill.kv.values")
    ),
    GateSpec("prefill_kv_keys_cosine", "cosine", "min_cosine", ">=", ("prefill.kv.keys",)),
    GateSpec("prefill_kv_values_cosine", "cosine", "min_cosine", ">=", ("prefill.kv.values",)),
    *_prefixed(OUTPUT_GATES, "prefill_decode_", "prefill.decode_metrics"),
)


# ---- the long window (validate_long) -------------------------------------------------------
# The runtime's run: a long prompt through the shard's own prefill (or decode) and cache, then
# decode from it; every position held to the decode window's hidden-state gates, and the KV
# cache read back.
LONG_GATES: tuple[GateSpec, ...] = (
    *_prefixed(OUTPUT_GATES, "long_", "long.metrics"),
    GateSpec(
        "long_step_delta_cosine",
        "step_delta_cosine",
        "min_step_delta_cosine",
        ">=",
        ("long.metrics",),
    ),
    GateSpec("long_kv_cosine", "kv_cosine", "min_kv_cosine", ">=", ("long.metrics",)),
    GateSpec("long_kv_unwritten", "kv_unwritten_max_abs", None, "<=", ("long.metrics",)),
)
# ---- end of the long window's gates -------------------------------------------------------


# ---- next-token verdicts and the bulk channels (issue 17.4; nexttoken.py) -----------------
# A layer shard's outputs finished by the fp32 reference (the remaining layers, the final norm,
# the LM head) against the full reference, over every validated position of every window:
# KL(ref || shard) within the whole-model budget (DESIGN.md, "Next-token verdicts": not split
# by layer share, since measured KL does not add up across layers; `build` gates the chain's).
# Read from golden.next_token.metrics, which a reader recomputes from its per-position records.
NEXT_TOKEN_SOURCE = "golden.next_token.metrics"
NEXT_TOKEN_GATES: tuple[GateSpec, ...] = (
    GateSpec("next_token_kl_mean", "kl_mean", "max_kl_mean", "<=", (NEXT_TOKEN_SOURCE,)),
    GateSpec("next_token_kl_worst", "kl_worst", "max_kl_worst", "<=", (NEXT_TOKEN_SOURCE,)),
    # The output without its massive channels, which hide a broken rest from cosine and RMSE.
    GateSpec("bulk_cosine", "bulk_cosine", "min_bulk_cosine", ">="),
    GateSpec("bulk_rmse", "bulk_rel_rmse", "max_rel_rmse", "<="),
)
# ---- end of the next-token block ------------------------------------------------------------


def gate_specs(
    kind: str, functions: Mapping[str, int] | None = None, long: bool = False
) -> tuple[GateSpec, ...]:
    """The mandatory gates of a package: its kind's, plus prefill's if it has that function,
    plus the long window's if the report has one (`long`), plus a layer shard's next-token and
    bulk gates."""
    specs = GATE_SETS[kind]
    if kind != KIND_LAYERS:
        return specs
    if "prefill" in (functions or {}):
        specs = specs + PREFILL_GATES
    return specs + (LONG_GATES if long else ()) + NEXT_TOKEN_GATES


@dataclass(frozen=True)
class Gate:
    """One gate's evidence; `passed` is always computed, never stored."""

    name: str
    value: float | None  # None: the metric was not finite (fails)
    bound: float
    op: str

    @property
    def passed(self) -> bool:
        v = self.value
        return v is not None and math.isfinite(v) and OPS[self.op](v, self.bound)

    def describe(self) -> str:
        """e.g. 'cosine 0.5 < 0.998' for a failed gate, 'cosine 0.9991 >= 0.998' otherwise."""
        op = self.op if self.passed else {">=": "<", "<=": ">"}[self.op]
        value = "non-finite" if self.value is None else f"{self.value:.6g}"
        return f"{self.name} {value} {op} {self.bound:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "bound": self.bound,
            "op": self.op,
            "passed": self.passed,
        }


def evaluate_gates(metrics: Mapping[str, Any], gates: Gates, kind: str) -> tuple[Gate, ...]:
    """The kind's gates on these golden metrics with these bounds; a missing metric fails."""
    return evaluate_specs({"golden": {"metrics": metrics}}, gates, GATE_SETS[kind])


def evaluate_specs(
    evidence: Mapping[str, Any], gates: Gates, specs: tuple[GateSpec, ...]
) -> tuple[Gate, ...]:
    """`specs` on `evidence` (shaped like the report's JSON) with these bounds."""
    return tuple(Gate(s.name, as_number(s.value(evidence)), s.bound(gates), s.op) for s in specs)


def as_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ---- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Golden:
    """Golden parity against transformers: overall metrics, per step, where NaN started."""

    metrics: dict[str, Any]
    per_step: list[dict[str, Any]]
    first_nonfinite: dict[str, Any] | None
    layer_max_abs: dict[int, float] = field(default_factory=dict)  # layer -> largest |x|
    windows: dict[str, Any] = field(default_factory=dict)  # "early"/"late" -> metrics
    kv: list[dict[str, Any]] = field(default_factory=list)  # per window, state, layer
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer metrics (mil)
    # nexttoken.next_token_verdict: metrics, per window, per position (layer shards).
    next_token: dict[str, Any] | None = None


def versions() -> dict[str, str]:
    out = {"anechain": __version__, "python": platform.python_version()}
    for dist in ("coremltools", "torch", "transformers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[dist] = "unknown"
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ValidationReport:
    """One package's validation: golden parity, gates, residency, and one verdict."""

    package: Path  # as written: relative to the report's folder once read back
    package_sha256: str  # sha256_tree of the package that was validated
    size_bytes: int
    meta: ShardMetadata
    backend: str
    steps: int
    golden: Golden
    gates: tuple[Gate, ...]
    residency: dict[str, Any]  # residency.ResidencyReport.to_dict()
    prefill: dict[str, Any] | None = None  # validate_prefill.PrefillGolden, two functions
    long: dict[str, Any] | None = None  # validate_long.LongGolden.to_dict(), the runtime's window
    created: str = field(default_factory=_now)
    versions: dict[str, str] = field(default_factory=versions)
    # The shard's output hidden states per validated position (validate_long.WindowOutputs per
    # window), for a consumer in the same process (next-token verdicts); never written.
    outputs: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def layers(self) -> LayerRange | None:
        return self.meta.layers

    @property
    def label(self) -> str:
        return f"{self.package.name} ({self.layers or 'head'})"

    @property
    def rope(self) -> dict[str, Any] | None:
        """Host-side RoPE data the exporter recorded (rope.RopeParameters.to_dict())."""
        return json.loads(self.meta.extra["rope"]) if "rope" in self.meta.extra else None

    @property
    def head_chunk_rows(self) -> int | None:
        rows = self.meta.extra.get("head_chunk_rows")
        return int(rows) if rows is not None else None

    @property
    def residency_passed(self) -> bool | None:
        passed = self.residency.get("passed")
        return passed if isinstance(passed, bool) else None

    @property
    def verdict(self) -> str:
        return "pass" if not self.failed_gates() else "fail"

    def failed_gates(self) -> list[str]:
        names = [g.name for g in self.gates if not g.passed]
        if self.residency_passed is False:
            names.append("residency")
        return names

    def failures(self) -> str:
        """The failed gates with their figures, e.g. 'finite 7 > 0, cosine 0.5 < 0.998'."""
        parts = [g.describe() for g in self.gates if not g.passed]
        if self.residency_passed is False:
            parts.append("residency")
        return ", ".join(parts)

    # -- checks a reader applies --

    def require_pass(self, where: Path | str) -> None:
        """ReportError unless every gate (recomputed) and residency passed."""
        if self.verdict != "pass":
            raise ReportError(
                f"shard {self.label} failed validation: {self.failures()} (report {where})"
            )

    def check_bounds(
        self, required: Gates, where: Path | str, residency: ResidencySettings | None = None
    ) -> None:
        """ReportError if a gate was applied with a bound looser than `required`'s, or a
        counted residency plan was judged more leniently than `residency`."""
        if residency is not None and self.residency["status"] != "not_checked":
            applied = residency_gate(self.residency.get("gate"))
            if (
                applied is None
                or _residency_limit(applied) > _residency_limit(residency)
                or applied.max_plumbing_share > residency.max_plumbing_share
            ):
                raise ReportError(
                    f"report {where}: residency was judged with {self.residency.get('gate')}, "
                    f"looser than {to_dict(residency)}; validate {self.package.name} again"
                )
        specs = {
            s.name: s for s in gate_specs(self.kind, self.meta.functions, self.long is not None)
        }
        for g in self.gates:
            spec = specs[g.name]
            need = spec.bound(required)
            if spec.looser(g.bound, need):
                what = f" ({spec.bound_field})" if spec.bound_field else ""
                raise ReportError(
                    f"report {where}: gate {g.name} was applied with bound {g.op} {g.bound:g}, "
                    f"looser than the required {g.op} {need:g}{what}; validate "
                    f"{self.package.name} again with these gates"
                )

    def check_windows(self, required: ValidationSettings, where: Path | str) -> None:
        """ReportError if this report ran fewer decode steps than `required` asks for: its
        early and late windows (layers), its steps (head), or the long window (below)."""
        if self.kind == KIND_LAYERS:
            ran = [s.get("window") for s in self.golden.per_step]
            late = (
                required.late_steps
                if required.steps + required.late_steps <= (self.meta.context_length)
                else 0
            )  # as validate._windows: no late window where it would overlap
            need = {"early": required.steps, "late": late}
        else:
            ran, need = ["early"] * self.steps, {"early": required.steps}
        for window, steps in need.items():
            if ran.count(window) < steps:
                raise ReportError(
                    f"report {where}: the config requires {steps} {window} decode steps, the "
                    f"report has {ran.count(window)}; validate {self.package.name} again "
                    "with this config"
                )
        self.check_long(required, where)

    def check_long(self, required: ValidationSettings, where: Path | str) -> None:
        """ReportError if `required` asks for the long window (the runtime's run) and this
        layer report has none, or one with fewer prompt positions or decode steps."""
        need = required.long_window(self.meta.context_length) if self.kind == KIND_LAYERS else None
        if need is None:
            return
        have = (self.long or {}).get("prompt", 0), (self.long or {}).get("decode_steps", 0)
        if self.long is None or have[0] < need[0] or have[1] < need[1]:
            got = "none" if self.long is None else f"{have[0]} + {have[1]}"
            raise ReportError(
                f"report {where}: the config requires a long window of {need[0]} prompt "
                f"positions + {need[1]} decode steps, the report has {got}; validate "
                f"{self.package.name} again with this config"
            )

    # -- JSON --

    def to_dict(self) -> dict[str, Any]:
        m = self.meta
        golden = {
            "metrics": self.golden.metrics,
            "per_step": self.golden.per_step,
            "first_nonfinite": self.golden.first_nonfinite,
            "layer_max_abs": {str(k): v for k, v in self.golden.layer_max_abs.items()},
            "windows": self.golden.windows,
            "kv": self.golden.kv,
            "layers": self.golden.layers,
            **({"next_token": self.golden.next_token} if self.golden.next_token else {}),
            # Written for readers of the JSON; never read back (recomputed from the gates).
            "passed": all(g.passed for g in self.gates),
        }
        return {
            "schema": REPORT_SCHEMA,
            "package": {
                "path": str(self.package),
                "sha256": self.package_sha256,
                "size_bytes": self.size_bytes,
            },
            "kind": m.kind,
            "layers": str(m.layers) if m.layers is not None else None,
            **({"head_chunk_rows": self.head_chunk_rows} if m.kind == KIND_HEAD else {}),
            "num_hidden_layers": m.num_hidden_layers,
            "checkpoint_fingerprint": m.checkpoint_fingerprint,
            "weights_fingerprint": m.weights_fingerprint,
            "quantization": m.quantization,
            "architecture": to_dict(m.architecture),
            "contract": m.contract.to_dict(),
            "functions": dict(m.functions),
            "prefill": self.prefill,
            "long": self.long,
            "context_length": m.context_length,
            "rope": self.rope,
            "backend": self.backend,
            "steps": self.steps,
            "golden": golden,
            "residency": self.residency,
            "gates": [g.to_dict() for g in self.gates],
            "verdict": self.verdict,
            "versions": self.versions,
            "created": self.created,
        }

    def write(self, path: str | Path) -> dict[str, Any]:
        """Write the report as JSON (atomically), the package path relative to the report."""
        path = Path(path)
        data = self.to_dict()
        # Relative to the report, so the pair can move together.
        data["package"]["path"] = os.path.relpath(self.package.resolve(), path.resolve().parent)
        atomic_write_json(path, data)  # strict JSON: a non-finite figure is null
        return data

    @classmethod
    def from_dict(cls, data: Any, where: Path | str = "report") -> ValidationReport:
        """Parse and check a report's JSON; gates are recomputed (see the module docstring)."""
        from anechain.report_read import parse_report

        return parse_report(data, where)


def report_path_for(package: str | Path) -> Path:
    """Reports live beside their package: layers_0_8.mlpackage -> layers_0_8.report.json."""
    package = Path(package)
    return package.with_name(package.stem + REPORT_SUFFIX)


def residency_gate(gate: Any) -> ResidencySettings | None:
    """The residency gate a report records (residency.ResidencyReport.to_dict()['gate'])."""
    if not isinstance(gate, dict):
        return None
    try:
        settings: ResidencySettings = from_dict(ResidencySettings, gate, "residency.gate")
    except ConfigError:
        return None
    return settings


def _residency_limit(settings: ResidencySettings) -> int:
    """How many compute ops off the ANE the gate lets through (strict: none)."""
    return 0 if settings.strict else settings.max_compute_non_ane
