"""The exceptions anechain raises; the CLI turns each into one line: exit 2 for UsageError,
1 for the rest."""

from __future__ import annotations

from typing import Any


class AnechainError(Exception):
    """Base class: a failure the user should see as a message, not a traceback."""


class ConfigError(AnechainError):
    """A config file, preset or option value is invalid."""


class CheckpointError(AnechainError):
    """A checkpoint folder is missing, malformed, or not a Phi-4-mini-style model."""


class ExportError(AnechainError):
    """Tracing, conversion, quantization or saving a package failed."""


class PackageError(AnechainError):
    """A .mlpackage is corrupt, or is not an anechain shard, or does not match its inputs."""


class RunnerError(AnechainError):
    """A shard runner cannot execute a program (unknown op, bad inputs)."""


class CompileError(AnechainError):
    """The Core ML compiler failed; carries its own message."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class ResidencyError(AnechainError):
    """A compute plan could not be read or replayed."""


class ParityError(AnechainError):
    """A shard failed a golden gate; carries the comparison."""

    def __init__(self, message: str, comparison: Any = None) -> None:
        super().__init__(message)
        self.comparison = comparison


class ManifestError(AnechainError):
    """A manifest cannot be built, loaded or verified."""


class ReportError(ManifestError):
    """A validation report is unreadable, malformed, forged, or says the shard failed."""


class PlatformError(AnechainError):
    """The command needs something this machine does not have (macOS, Core ML)."""


class UsageError(AnechainError):
    """The command was given something it cannot use: exit 2, like click's usage errors."""


class OutputPathError(UsageError):
    """An output path that cannot be written (a FIFO, a socket, a block device)."""


class DiskFullError(AnechainError):
    """The disk filled up while an artifact was written; names the file and the space."""
