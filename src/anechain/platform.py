"""What this machine can do: macOS-only Core ML features are gated here, in one place."""

from __future__ import annotations

import platform
import sys

from anechain.errors import PlatformError


def is_macos() -> bool:
    return sys.platform == "darwin"


def macos_version() -> tuple[int, ...] | None:
    if not is_macos():
        return None
    release = platform.mac_ver()[0]
    return tuple(int(p) for p in release.split(".") if p.isdigit()) or None


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
