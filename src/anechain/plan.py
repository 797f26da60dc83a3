"""Find the topology with the fewest shards that passes every gate, automatically.

Two layers. `search_topology` is a pure function over an injected
`validate(range) -> RangeResult`: it knows nothing of exports. `RangeValidator` is the real
validator: export the range, validate it (golden parity, plus residency where it can be
checked) and cache both in the report folder, keyed by everything they depend on, so a
re-run or a widened search never rebuilds a package it already has. `plan_topology` ties
them together and writes the chosen shards' manifest through `build_manifest`.

The report folder holds, per range tried, `layers_S_E.mlpackage` and
`layers_S_E.report.json` (the `anechain validate shard` convention), plus the artifact cache
`artifacts.py` keeps for `plan` and `build` alike (artifact-cache.json): what each package
and verdict was made from. In a folder without that file, a package or report is refused
unless `overwrite` is set: the plan did not make it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anechain.artifacts import ArtifactCache, InputKeys, VerdictInputs
from anechain.checkpoint import Checkpoint
from anechain.config import ExportSettings, LayerRange, ValidationSettings
from anechain.errors import CompileError, ExportError
from anechain.report import ValidationReport, report_path_for
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

_PACKAGE_NAME = re.compile(r"^layers_(\d+)_(\d+)\.(mlpackage|report\.json)$")


# ---- the real validator: export + validate_shard, cached ------------------------------------


_RESIDENCY_TEXT = {"checked": "checked", "report_only": "report only", "not_checked": "not checked"}


def range_result_from_report(report: ValidationReport, path: Path | None = None) -> RangeResult:
    """A validation report (gates recomputed when read) as the search sees it."""
    failed = report.failed_gates()
    first = report.golden.first_nonfinite or None
    layer = first.get("layer") if first else None
    reasons = [f"gate(s) failed: {report.failures()}"] if failed else []
    if first:
        where = f" in layer {layer}" if layer is not None else ""
        op = f" at op {first['op']}" if first.get("op") else ""
        reasons.append(f"first non-finite value at step {first.get('step')}{where}{op}")
    residency = report.residency
    if report.residency_passed is False:
        c = residency.get("counts") or {}
        reasons.append(
            f"residency: conv {c.get('conv_ane', '?')}/{c.get('conv_total', '?')} on the ANE, "
            f"{c.get('compute_non_ane', '?')} compute op(s) elsewhere"
        )
    status = _RESIDENCY_TEXT.get(residency["status"], str(residency["status"]))
    if report.residency_passed is False:
        status += " FAIL"
    return RangeResult(
        passed=report.verdict == "pass",
        failed_gates=tuple(failed),
        failing_layer=int(layer) if layer is not None else None,
        reason="; ".join(reasons),
        residency=status,
        size_bytes=report.size_bytes,
        report=path,
    )


class RangeValidator:
    """`validate(range)` for the search: export + validate_shard, cached in `report_dir`.

    Reuse is decided by artifacts.py, as for `build`: a package is reused when it was made
    from the same inputs and is unchanged, a verdict when it was reached from the same inputs
    on this very package (read back through its report, gates recomputed). An export or
    compile failure counts as a failed range and is cached like a verdict.
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
        from anechain.residency import expected_live_status
        from anechain.runners import available_backend
        from anechain.validate import ResidencyOptions, validate_shard

        self.checkpoint = checkpoint
        self.report_dir = Path(report_dir)
        self.export_settings = export_settings
        self.validation_settings = validation_settings
        self.backend = available_backend(backend)
        self.residency = residency or ResidencyOptions()
        self.cache_dir = cache_dir
        self.progress = progress
        self.export_fn = export_fn or export_shard
        self.validate_fn = validate_fn or validate_shard
        self.keys = InputKeys(checkpoint)
        self.how = VerdictInputs(
            validation_settings,
            self.backend,
            self.residency.settings,
            self.residency.report_only,
            expected_live_status(),
        )
        self.cache = ArtifactCache(self.report_dir, progress)
        if not overwrite:
            self._refuse_unknown_files()

    def _refuse_unknown_files(self) -> None:
        """Never replace a package or report this plan did not make. A folder holding a
        cache file, even an unreadable one, is a plan's own."""
        if not self.report_dir.is_dir() or self.cache.found:
            return
        for p in sorted(self.report_dir.iterdir()):
            if _PACKAGE_NAME.match(p.name):
                raise PlanError(
                    f"{p} was not made by this plan (there is no {self.cache.path}); pass "
                    "--overwrite to replace it, or choose another --report-dir"
                )

    def package_path(self, layers: LayerRange) -> Path:
        return self.report_dir / f"layers_{layers.start}_{layers.end}.mlpackage"

    def report_path(self, layers: LayerRange) -> Path:
        return report_path_for(self.package_path(layers))

    def __call__(self, layers: LayerRange) -> RangeResult:
        from anechain.export import LayerSpec

        label = str(layers)
        package, report = self.package_path(layers), self.report_path(layers)
        key = self.keys.export_key("layers", layers, self.export_settings)
        failure = self.cache.export_failure(package, key)
        if failure is not None:
            return RangeResult(False, ("export",), None, failure, reused=True)
        sha = self.cache.exported(package, key)
        if sha is None:
            if self.progress:
                self.progress(f"[{label}] exporting {package.name}")
            report.unlink(missing_ok=True)  # it describes the package being replaced
            try:
                self.export_fn(
                    self.checkpoint,
                    LayerSpec(layers, package),
                    self.export_settings,
                    overwrite=True,  # ours (in the cache), or accepted with --overwrite
                    progress=self.progress,
                )
            except ExportError as exc:
                reason = f"export failed: {exc}"
                self.cache.record_export_failure(package, key, reason)
                return RangeResult(False, ("export",), None, reason)
            sha = self.cache.record_export(package, key)
        vkey = self.keys.verdict_key(sha, layers, self.how)
        verdict = self.cache.verdict(package, vkey)
        if verdict is not None and verdict.failure is not None:
            return RangeResult(False, ("compile",), None, verdict.failure, reused=True)
        if verdict is not None and verdict.report is not None:
            return replace(range_result_from_report(verdict.report, report), reused=True)
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
            reason = f"compile failed: {exc}"
            self.cache.record_verdict(package, vkey, failure=reason)
            return RangeResult(False, ("compile",), None, reason)
        validation.write(report)
        self.cache.record_verdict(package, vkey)
        return range_result_from_report(validation, report)


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
    from anechain.manifest_build import build_manifest

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
    manifest = build_manifest(
        reports,
        out,
        overwrite=overwrite,
        gates=validation_settings.gates,
        residency=validator.residency.settings,
        validation=validation_settings,
    )
    return PlanOutcome(search, out, manifest, reports)
