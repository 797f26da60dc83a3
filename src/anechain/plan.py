"""Find the topology with the fewest shards that passes every gate, automatically.

Two layers. `search_topology` is a pure function over an injected
`validate(range) -> RangeResult`: it knows nothing of exports. `RangeValidator` is the real
validator: export the range, validate it (golden parity, plus residency where it can be
checked) and cache both in the report folder, keyed by everything they depend on, so a
re-run or a widened search never rebuilds a package it already has. `plan_topology` ties
them together and writes the chosen shards' manifest through `build_manifest`.

The report folder (the cache) holds, per range tried, `layers_S_E.mlpackage` and
`layers_S_E.report.json` (the `anechain validate shard` convention), plus `plan-cache.json`,
which records the key each package and report was made with. An entry whose key differs
is rebuilt; a package or report there that the index does not know is refused unless
`overwrite` is set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from anechain import __version__
from anechain.checkpoint import Checkpoint
from anechain.config import ExportSettings, LayerRange, ValidationSettings, to_dict
from anechain.errors import CompileError, ExportError
from anechain.fsutil import sha256_tree
from anechain.jsonio import atomic_write_json
from anechain.search import (  # noqa: F401  (re-exported)
    Attempt,
    PlanError,
    PlanLimits,
    RangeResult,
    SearchResult,
    best_partition,
    estimate_shard_bytes,
    initial_partition,
    layers_per_shard_limit,
    search_topology,
    split_range,
)

Progress = Callable[[str], None]

CACHE_INDEX = "plan-cache.json"
CACHE_SCHEMA = "anechain.plan-cache/1"
_PACKAGE_NAME = re.compile(r"^layers_(\d+)_(\d+)\.(mlpackage|report\.json)$")


# ---- the real validator: export + validate_shard, cached ------------------------------------


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return None


_RESIDENCY_TEXT = {"checked": "checked", "report_only": "report only", "not_checked": "not checked"}


def range_result_from_report(data: dict[str, Any], report: Path | None = None) -> RangeResult:
    """A validation report (JSON, as `write_report` writes it) as the search sees it."""
    failed = [g["name"] for g in data["gates"] if not g["passed"]]
    residency = data["residency"]
    if residency.get("passed") is False:
        failed.append("residency")
    first = data["golden"].get("first_nonfinite") or None
    layer = first.get("layer") if first else None
    reasons = []
    if failed:
        reasons.append(f"gate(s) {', '.join(failed)} failed")
    if first:
        where = f" in layer {layer}" if layer is not None else ""
        op = f" at op {first['op']}" if first.get("op") else ""
        reasons.append(f"first non-finite value at step {first['step']}{where}{op}")
    if residency.get("passed") is False:
        c = residency.get("counts") or {}
        reasons.append(
            f"residency: conv {c.get('conv_ane', '?')}/{c.get('conv_total', '?')} on the ANE, "
            f"{c.get('compute_non_ane', '?')} compute op(s) elsewhere"
        )
    status = _RESIDENCY_TEXT.get(residency.get("status", ""), str(residency.get("status")))
    if residency.get("passed") is False:
        status += " FAIL"
    return RangeResult(
        passed=data["verdict"] == "pass",
        failed_gates=tuple(failed),
        failing_layer=int(layer) if layer is not None else None,
        reason="; ".join(reasons),
        residency=status,
        size_bytes=data["package"].get("size_bytes"),
        report=report,
    )


def _result_to_dict(r: RangeResult) -> dict[str, Any]:
    return {
        "passed": r.passed,
        "failed_gates": list(r.failed_gates),
        "failing_layer": r.failing_layer,
        "reason": r.reason,
        "residency": r.residency,
        "size_bytes": r.size_bytes,
    }


def _result_from_dict(d: dict[str, Any], report: Path | None) -> RangeResult:
    return RangeResult(
        passed=bool(d["passed"]),
        failed_gates=tuple(d["failed_gates"]),
        failing_layer=d["failing_layer"],
        reason=d["reason"],
        residency=d["residency"],
        size_bytes=d["size_bytes"],
        reused=True,
        report=report,
    )


class RangeValidator:
    """`validate(range)` for the search: export + validate_shard, cached in `report_dir`.

    The export key is the checkpoint fingerprint, the weights fingerprint of each layer in
    the range, the export settings and the anechain/coremltools/torch versions; the
    validation key adds the package's sha256, the validation settings (gates included),
    the backend and the residency options. A cached package is reused only if its sha256
    is still the one recorded. An export or compile failure counts as a failed range.
    `export_fn`/`validate_fn` default to `export_shard`/`validate_shard` (tests count calls).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        report_dir: Path,
        export_settings: ExportSettings,
        validation_settings: ValidationSettings,
        backend: str = "auto",
        residency: Any = None,  # validate.ResidencyOptions | None
        cache_dir: Path | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        export_fn: Callable[..., Any] | None = None,
        validate_fn: Callable[..., Any] | None = None,
    ) -> None:
        from anechain.export import export_shard
        from anechain.residency import live_plan_available
        from anechain.runners import resolve_backend
        from anechain.validate import ResidencyOptions, validate_shard

        self.checkpoint = checkpoint
        self.report_dir = Path(report_dir)
        # The topology list is the plan's output, not an input of any one shard.
        self.export_settings = replace(export_settings, topology=())
        self.validation_settings = validation_settings
        self.backend = resolve_backend(backend)
        self.residency = residency or ResidencyOptions()
        self.cache_dir = cache_dir
        self.progress = progress
        self.export_fn = export_fn or export_shard
        self.validate_fn = validate_fn or validate_shard
        self._layer_fingerprints: dict[int, str] = {}
        self._residency_key = {
            "settings": to_dict(self.residency.settings),
            "report_only": self.residency.report_only,
            "live": live_plan_available(),
        }
        self.index_path = self.report_dir / CACHE_INDEX
        self.entries = self._load_index(overwrite)
        if not overwrite:
            self._refuse_unknown_files()

    # -- cache index --

    def _load_index(self, overwrite: bool) -> dict[str, dict[str, Any]]:
        if not self.index_path.exists():
            return {}
        try:
            data = json.loads(self.index_path.read_text())
            if data["schema"] != CACHE_SCHEMA or not isinstance(data["entries"], dict):
                raise ValueError
            entries: dict[str, dict[str, Any]] = data["entries"]
            return entries
        except (ValueError, KeyError, TypeError):
            if overwrite:
                return {}
            raise PlanError(
                f"plan cache {self.index_path} is unreadable; pass --overwrite to start afresh"
            ) from None

    def _save_index(self) -> None:
        data = {"schema": CACHE_SCHEMA, "entries": self.entries}
        atomic_write_json(self.index_path, data)

    def _refuse_unknown_files(self) -> None:
        if not self.report_dir.is_dir():
            return
        for p in sorted(self.report_dir.iterdir()):
            m = _PACKAGE_NAME.match(p.name)
            if m and f"{m[1]}:{m[2]}" not in self.entries:
                raise PlanError(
                    f"{p} was not made by this plan (it is not in {self.index_path}); pass "
                    "--overwrite to replace it, or choose another --report-dir"
                )

    # -- keys --

    def package_path(self, layers: LayerRange) -> Path:
        return self.report_dir / f"layers_{layers.start}_{layers.end}.mlpackage"

    def report_path(self, layers: LayerRange) -> Path:
        from anechain.validate import default_report_path

        return default_report_path(self.package_path(layers))

    def _layer_fingerprint(self, layer: int) -> str:
        if layer not in self._layer_fingerprints:
            names = self.checkpoint.layer_tensor_names(LayerRange(layer, layer + 1))
            self._layer_fingerprints[layer] = self.checkpoint.weights_fingerprint(names)
        return self._layer_fingerprints[layer]

    def export_key(self, layers: LayerRange) -> str:
        return _digest(
            {
                "layers": str(layers),
                "checkpoint_fingerprint": self.checkpoint.fingerprint,
                "weights_fingerprints": [
                    self._layer_fingerprint(i) for i in range(layers.start, layers.end)
                ],
                "export": to_dict(self.export_settings),
                "versions": {
                    "anechain": __version__,
                    "coremltools": _dist_version("coremltools"),
                    "torch": _dist_version("torch"),
                },
            }
        )

    def validation_key(self, export_key: str, package_sha256: str) -> str:
        return _digest(
            {
                "export_key": export_key,
                "package_sha256": package_sha256,
                "validation": to_dict(self.validation_settings),
                "backend": self.backend,
                "residency": self._residency_key,
                "anechain": __version__,
            }
        )

    # -- the validator --

    def __call__(self, layers: LayerRange) -> RangeResult:
        from anechain.export import LayerSpec
        from anechain.validate import write_report

        label = str(layers)
        package, report = self.package_path(layers), self.report_path(layers)
        ekey = self.export_key(layers)
        entry = self.entries.get(label)
        if entry is not None and entry.get("export_key") != ekey:
            entry = None  # made from other inputs: rebuild
        if entry is not None and "export_error" in entry:
            return RangeResult(False, ("export",), None, entry["export_error"], reused=True)
        if entry is not None and not (
            package.is_dir() and sha256_tree(package) == entry.get("package_sha256")
        ):
            entry = None  # missing, or changed since it was made
        if entry is None:
            if self.progress:
                self.progress(f"[{label}] exporting {package.name}")
            report.unlink(missing_ok=True)  # it describes the package being replaced
            try:
                self.export_fn(
                    self.checkpoint,
                    LayerSpec(layers, package),
                    self.export_settings,
                    overwrite=True,  # ours (in the index), or accepted with --overwrite
                    progress=self.progress,
                )
            except ExportError as exc:
                reason = f"export failed: {exc}"
                self.entries[label] = {"export_key": ekey, "export_error": reason}
                self._save_index()
                return RangeResult(False, ("export",), None, reason)
            entry = {"export_key": ekey, "package_sha256": sha256_tree(package)}
            self.entries[label] = entry
            self._save_index()
        vkey = self.validation_key(ekey, entry["package_sha256"])
        cached = entry.get("result") if entry.get("validation_key") == vkey else None
        if cached is not None and (
            cached.get("compile_error") or self._report_matches(report, entry)
        ):
            return _result_from_dict(cached, report if report.is_file() else None)
        if self.progress:
            self.progress(f"[{label}] validating with the {self.backend} runner")
        report.unlink(missing_ok=True)
        try:
            validation = self.validate_fn(
                package,
                self.checkpoint,
                self.validation_settings,
                backend=self.backend,
                residency=self.residency,
                cache_dir=self.cache_dir,
                progress=self.progress,
            )
        except CompileError as exc:  # the Core ML compiler refused the fused graph
            result = RangeResult(False, ("compile",), None, f"compile failed: {exc}")
            entry.update(
                validation_key=vkey, result={**_result_to_dict(result), "compile_error": True}
            )
            self._save_index()
            return result
        data = write_report(validation, report)
        result = range_result_from_report(data, report)
        entry.update(validation_key=vkey, result=_result_to_dict(result))
        self._save_index()
        return result

    @staticmethod
    def _report_matches(report: Path, entry: dict[str, Any]) -> bool:
        try:
            data = json.loads(report.read_text())
            return bool(data["package"]["sha256"] == entry["package_sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return False


# ---- the command's library function ----------------------------------------------------------


@dataclass
class PlanOutcome:
    search: SearchResult
    manifest_path: Path
    manifest: Any  # manifest.Manifest
    reports: list[Path] = field(default_factory=list)  # the chosen shards' reports


def check_plan_outputs(report_dir: Path, manifest_path: Path, overwrite: bool) -> None:
    """Refuse, before any work, a manifest that exists or that cannot reach the shards."""
    if (manifest_path.exists() or manifest_path.is_symlink()) and not overwrite:
        raise PlanError(f"{manifest_path} already exists; pass --overwrite to replace it")
    root = manifest_path.parent.resolve()
    if not Path(report_dir).resolve().is_relative_to(root):
        raise PlanError(
            f"the report folder {report_dir} must be inside the manifest's folder {root}: a "
            "manifest only references files in its own folder"
        )


def plan_topology(
    checkpoint: Checkpoint,
    report_dir: Path,
    export_settings: ExportSettings,
    validation_settings: ValidationSettings,
    limits: PlanLimits,
    backend: str = "auto",
    residency: Any = None,  # validate.ResidencyOptions | None
    manifest_path: Path | None = None,
    overwrite: bool = False,
    rebalance: bool = True,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    export_fn: Callable[..., Any] | None = None,
    validate_fn: Callable[..., Any] | None = None,
) -> PlanOutcome:
    """Search for the topology (`search_topology`) with real, cached validation, then write
    the chosen shards' manifest (default REPORT_DIR/manifest.json) through `build_manifest`."""
    from anechain.manifest import build_manifest

    report_dir = Path(report_dir)
    out = Path(manifest_path) if manifest_path is not None else report_dir / "manifest.json"
    check_plan_outputs(report_dir, out, overwrite)
    if validation_settings.steps > export_settings.context_length:
        raise PlanError(
            f"{validation_settings.steps} validation steps do not fit a context of "
            f"{export_settings.context_length}"
        )
    arch = checkpoint.architecture
    max_layers = layers_per_shard_limit(arch, limits, export_settings.quantization)
    validator = RangeValidator(
        checkpoint,
        report_dir,
        export_settings,
        validation_settings,
        backend=backend,
        residency=residency,
        cache_dir=cache_dir,
        overwrite=overwrite,
        progress=progress,
        export_fn=export_fn,
        validate_fn=validate_fn,
    )
    search = search_topology(arch.num_hidden_layers, max_layers, validator, rebalance, progress)
    reports = [validator.report_path(r) for r in search.topology]
    manifest = build_manifest(reports, out, overwrite=overwrite)
    return PlanOutcome(search, out, manifest, reports)
