"""What this machine can do: macOS-only Core ML features are gated here, in one place.

Tests state their needs with the same predicates (`macos_at_least`, `has_neural_engine`), so
an expectation computed in a test is the one the code applies.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from typing import Any

from anechain.errors import PlatformError

# MLAllComputeDevices (coremltools' MLComputeDevice.get_all_compute_devices) exists from 14.0.
DEVICES_MIN_MACOS = (14,)


def is_macos() -> bool:
    return sys.platform == "darwin"


def macos_version() -> tuple[int, ...] | None:
    if not is_macos():
        return None
    release = platform.mac_ver()[0]
    return tuple(int(p) for p in release.split(".") if p.isdigit()) or None


def macos_at_least(minimum: tuple[int, ...]) -> bool:
    version = macos_version()
    return version is not None and version >= minimum


def require_macos(what: str, minimum: tuple[int, ...] = (15,)) -> None:
    """Raise PlatformError unless this is macOS >= minimum; `what` names the feature."""
    version = macos_version()
    need = ".".join(str(v) for v in minimum)
    if version is None:
        raise PlatformError(
            f"{what} needs macOS {need}+ with Core ML; this machine runs {sys.platform}"
        )
    if version < minimum:
        have = ".".join(str(v) for v in version)
        raise PlatformError(f"{what} needs macOS {need}+; this machine runs macOS {have}")


def _all_compute_devices() -> list[Any]:
    from coremltools.models.compute_device import MLComputeDevice

    return list(MLComputeDevice.get_all_compute_devices())


def neural_engine_cores(devices: list[Any] | None = None) -> int:
    """Cores of the Neural Engine Core ML can use here; 0 when there is none.

    Asks Core ML itself (MLAllComputeDevices through coremltools), not a machine label: hosted
    macOS runners are virtual machines whose Core ML lists a CPU and a GPU but no Neural
    Engine. `devices` replaces the query (tests).
    """
    from coremltools.models.compute_device import MLNeuralEngineComputeDevice

    if devices is None:
        if not macos_at_least(DEVICES_MIN_MACOS):
            return 0
        try:
            devices = _all_compute_devices()
        except Exception:  # no native proxy (coremltools built without Core ML)
            return 0
    engines = [d for d in devices if isinstance(d, MLNeuralEngineComputeDevice)]
    return max((int(d.total_core_count) for d in engines), default=0)


@functools.cache
def has_neural_engine() -> bool:
    """True on a Mac whose Core ML reports a Neural Engine with at least one core."""
    return neural_engine_cores() > 0


def chip_name() -> str:
    """The CPU brand string ("Apple M2 Pro"), or the machine type where sysctl has none."""
    if is_macos():
        probe = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip():
            return probe.stdout.strip()
    return platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a captured result must say about the machine it came from."""
    from importlib import metadata

    version = macos_version()
    return {
        "system": sys.platform,
        "machine": platform.machine(),
        "chip": chip_name(),
        "macos": ".".join(map(str, version)) if version else None,
        "coremltools": metadata.version("coremltools"),
        "neural_engine_cores": neural_engine_cores(),
    }
