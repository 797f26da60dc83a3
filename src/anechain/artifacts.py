"""One artifact cache for `build` and `plan`: when an artifact and its verdict can be reused.

Both commands export packages and validate them in a folder; `artifact-cache.json` in that
folder records, per artifact (by file name):

- `export_key`: the inputs it was made from (`InputKeys.export_key`): checkpoint
  fingerprint, the full fingerprint of every tensor it holds, the range, the export settings
  (not the topology list: that is an output of `plan`, not an input of any one shard) and
  the anechain, coremltools and torch versions;
- `sha256`: the artifact as made; a file changed since is rebuilt;
- `verdict_key`: what its verdict depends on besides the package (`InputKeys.verdict_key`):
  the package's sha256, the weights the reference runs through (layers before the range
  included: they make its input), the validation settings (gates, steps, calibration), the
  backend, residency settings and whether residency can be checked here, and the
  transformers/torch/numpy versions the reference comes from;
- or a failure (`export_failure`, `verdict_failure`) reached from those same inputs, so a
  search does not try it again.

A verdict is reused only through the report beside the package, read with
`report.read_report` (gates recomputed, mandatory gates required) and describing this very
package. An unreadable or foreign cache file is a miss: everything is made again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anechain import __version__
from anechain.config import ExportSettings, LayerRange, ResidencySettings, ValidationSettings
from anechain.config import to_dict as config_dict
from anechain.errors import ManifestError
from anechain.fsutil import sha256_tree
from anechain.jsonio import atomic_write_json, loads_json
from anechain.report import ValidationReport, report_path_for
from anechain.report_read import read_report

if TYPE_CHECKING:
    from anechain.checkpoint import Checkpoint

CACHE_FILE = "artifact-cache.json"
CACHE_SCHEMA = "anechain.artifact-cache/1"


def digest(data: Any) -> str:
    """sha256 of canonical JSON."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _versions(*names: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"anechain": __version__}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[name] = None
    return out


@dataclass(frozen=True)
class VerdictInputs:
    """How a package is validated, besides the package itself."""

    validation: ValidationSettings
    backend: str  # resolved: "mil" | "coreml"
    residency: ResidencySettings
    residency_report_only: bool
    # What residency can be on this machine without a saved plan (checked | report_only |
    # not_checked: residency.expected_live_status), which changes the verdict.
    residency_live: str


class InputKeys:
    """The keys of one checkpoint's artifacts; each tensor's full hash is computed once."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._tensors: dict[str, str] = {}

    def tensors(self, names: Iterable[str]) -> list[str]:
        out = []
        for name in names:
            if name not in self._tensors:
                self._tensors[name] = self.checkpoint.weights_fingerprint([name])
            out.append(self._tensors[name])
        return out

    def _layers(self, layers: LayerRange) -> list[str]:
        return self.tensors(self.checkpoint.layer_tensor_names(layers))

    def _holds(self, kind: str, layers: LayerRange | None) -> list[str]:
        from anechain.head import head_tensor_names

        if kind == "layers" and layers is not None:
            return self._layers(layers)
        if kind == "head":
            return self.tensors(head_tensor_names(self.checkpoint))
        if kind == "embedding":
            return self.tensors(["model.embed_tokens.weight"])
        raise ValueError(f"unknown artifact kind {kind!r}")  # internal

    def export_key(
        self, kind: str, layers: LayerRange | None, settings: ExportSettings | None
    ) -> str:
        """`kind` is layers | head | embedding; the embedding has no export settings."""
        return digest(
            {
                "kind": kind,
                "layers": str(layers) if layers else None,
                "checkpoint": self.checkpoint.fingerprint,
                "tensors": self._holds(kind, layers),
                "export": config_dict(replace(settings, topology=())) if settings else None,
                "versions": _versions("coremltools", "torch"),
            }
        )

    def verdict_key(
        self, package_sha256: str, layers: LayerRange | None, how: VerdictInputs
    ) -> str:
        """`layers` None: the head, whose reference runs every layer."""
        n = self.checkpoint.architecture.num_hidden_layers
        # The reference input of [start, end) comes out of the embedding and layers [0, start).
        reference = self._holds("embedding", None)
        reference += self._layers(LayerRange(0, layers.end if layers else n))
        if layers is None:
            reference += self._holds("head", None)
        return digest(
            {
                "package": package_sha256,
                "checkpoint": self.checkpoint.fingerprint,
                "reference": reference,
                "validation": config_dict(how.validation),
                "backend": how.backend,
                "residency": config_dict(how.residency),
                "residency_report_only": how.residency_report_only,
                "residency_live": how.residency_live,
                "versions": _versions("coremltools", "torch", "transformers", "numpy"),
            }
        )


@dataclass(frozen=True)
class Verdict:
    """A reusable verdict: the package's report, or the failure that stood for one."""

    report: ValidationReport | None
    failure: str | None = None


class ArtifactCache:
    """`artifact-cache.json` in one folder (see the module docstring)."""

    def __init__(self, folder: Path, progress: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / CACHE_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        self.found = self.path.exists() or self.path.is_symlink()
        if not self.found:
            return
        try:
            data = loads_json(self.path.read_text())
            entries = data["entries"] if data["schema"] == CACHE_SCHEMA else None
            if not isinstance(entries, dict):
                raise ValueError
            self.entries = {k: v for k, v in entries.items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, TypeError):
            if progress:
                progress(f"{self.path} is unreadable: everything in {self.folder} is made again")

    def knows(self, artifact: Path) -> bool:
        return artifact.name in self.entries

    def _save(self) -> None:
        data = {"schema": CACHE_SCHEMA, "entries": self.entries}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, data)

    def _entry(self, artifact: Path) -> dict[str, Any]:
        return self.entries.get(artifact.name, {})

    # -- exports --

    def exported(self, artifact: Path, key: str) -> str | None:
        """The artifact's sha256 if it was made from `key` and is unchanged since, else None."""
        entry = self._entry(artifact)
        if entry.get("export_key") != key or "sha256" not in entry or not artifact.exists():
            return None
        sha = sha256_tree(artifact)
        return sha if sha == entry["sha256"] else None

    def export_failure(self, artifact: Path, key: str) -> str | None:
        entry = self._entry(artifact)
        return entry.get("export_failure") if entry.get("export_key") == key else None

    def record_export(self, artifact: Path, key: str) -> str:
        sha = sha256_tree(artifact)
        self.entries[artifact.name] = {"export_key": key, "sha256": sha}
        self._save()
        return sha

    def record_export_failure(self, artifact: Path, key: str, reason: str) -> None:
        self.entries[artifact.name] = {"export_key": key, "export_failure": reason}
        self._save()

    # -- verdicts --

    def verdict(self, package: Path, key: str) -> Verdict | None:
        """The verdict reached with `key` on this package, if it still stands."""
        entry = self._entry(package)
        if entry.get("verdict_key") != key:
            return None
        if isinstance(entry.get("verdict_failure"), str):
            return Verdict(None, entry["verdict_failure"])
        try:
            _, report = read_report(report_path_for(package))
        except ManifestError:  # missing, unreadable, forged: validate again
            return None
        return Verdict(report) if report.package_sha256 == entry.get("sha256") else None

    def record_verdict(self, package: Path, key: str, failure: str | None = None) -> None:
        """After the report beside `package` was written (or `failure` stood for one)."""
        entry = self.entries.setdefault(package.name, {})
        entry.pop("verdict_failure", None)
        entry["verdict_key"] = key
        if failure is not None:
            entry["verdict_failure"] = failure
        self._save()

    def forget_verdict(self, package: Path) -> None:
        """Before a new export or validation: the old verdict no longer describes it."""
        entry = self._entry(package)
        if entry.pop("verdict_key", None) is not None or entry.pop("verdict_failure", None):
            self._save()
