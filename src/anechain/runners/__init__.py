"""One runner interface, two implementations: `mil` (any OS) and `coreml` (macOS 15+).

Both are driven by the same step-by-step decode loop; a runner owns the shard's state
(KV cache) and carries it across steps until `reset()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from anechain.errors import ConfigError
from anechain.platform import is_macos

BACKENDS = ("auto", "mil", "coreml")


class ShardRunner(Protocol):
    name: str

    def reset(self) -> None:
        """Zero every state (a fresh KV cache)."""

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one prediction; states are read and updated in place."""

    def read_state(self, name: str) -> np.ndarray:
        """Current value of a state, in its declared dtype."""

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace a state's value (validation fills the KV cache from the reference)."""


def resolve_backend(backend: str) -> str:
    """`auto` is `coreml` on macOS and `mil` elsewhere."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "coreml" if is_macos() else "mil"
    return backend


def available_backend(backend: str) -> str:
    """`resolve_backend`, and PlatformError now if this machine cannot run it: commands that
    export for hours before their first validation check this first."""
    resolved = resolve_backend(backend)
    if resolved == "coreml":
        from anechain.platform import require_macos

        require_macos("the coreml backend (Core ML stateful predict)", (15,))
    return resolved


def open_runner(backend: str, package: str | Path, **options: object) -> ShardRunner:
    """A runner for `package` (an .mlpackage; the coreml runner compiles or takes .mlmodelc).

    Both runners take `function=` (a function of a multifunction package; default: its
    default one) and `state_from=` (a runner of the same package whose states this one
    shares: prefill fills the KV cache decode continues from).
    """
    backend = resolve_backend(backend)
    if backend == "mil":
        from anechain.runners.mil import MILRunner

        return MILRunner(package, **options)  # type: ignore[arg-type]
    from anechain.runners.coreml import CoreMLRunner

    return CoreMLRunner(package, **options)  # type: ignore[arg-type]
