""".mlpackage -> .mlmodelc with the Core ML compiler (macOS), atomically, skipped when up to date.

The compiled folder appears complete at its path or not at all. Beside it, a small sidecar
`<name>.mlmodelc.source.json` records the sha256 of the package it was compiled from; a later
compile of an unchanged package is skipped. The compiler itself sits behind a `Compiler`
callable so the atomic write and the skip can be exercised without macOS.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anechain.errors import CompileError
from anechain.fsutil import atomic_path, sha256_tree
from anechain.jsonio import atomic_write_json
from anechain.package import check_package
from anechain.platform import require_macos

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = "anechain.compile-source/1"
SIDECAR_SUFFIX = ".source.json"
# Stateful ML Programs (spec 9, iOS18/macOS15) need the macOS 15 compiler.
MIN_MACOS = (15,)


@dataclass(frozen=True)
class Compiler:
    """A named way to compile: `run(package, dest)` must create the folder `dest` (.mlmodelc)."""

    name: str
    run: Callable[[Path, Path], None]


@dataclass(frozen=True)
class CompileResult:
    package: Path
    compiled: Path
    source_sha256: str
    skipped: bool  # True: the compiled model was already up to date
    compiler: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": str(self.package),
            "compiled": str(self.compiled),
            "source_sha256": self.source_sha256,
            "skipped": self.skipped,
            "compiler": self.compiler,
            "seconds": round(self.seconds, 2),
        }


def _xcrun_compile(package: Path, dest: Path) -> None:
    # coremlcompiler names its output after the package; compile into a scratch folder
    # beside dest (same filesystem) and move the one result into place.
    scratch = Path(tempfile.mkdtemp(prefix=".coremlcompiler.", dir=dest.parent))
    try:
        cmd = ["xcrun", "coremlcompiler", "compile", str(package), str(scratch)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            msg = (exc.stderr or exc.stdout or "").strip()
            raise CompileError(
                f"xcrun coremlcompiler failed on {package} (exit {exc.returncode}): "
                f"{_last_line(msg)}",
                stderr=msg,
            ) from None
        produced = sorted(scratch.glob("*.mlmodelc"))
        if len(produced) != 1:
            raise CompileError(f"xcrun coremlcompiler wrote no .mlmodelc for {package}")
        produced[0].rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _coremltools_compile(package: Path, dest: Path) -> None:
    from coremltools.models.utils import compile_model

    try:
        compile_model(str(package), str(dest))
    except Exception as exc:  # coremltools raises bare Exceptions with the framework's message
        raise CompileError(f"Core ML could not compile {package}: {exc}", stderr=str(exc)) from None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _has_xcrun_coremlcompiler() -> bool:
    if shutil.which("xcrun") is None:
        return False
    probe = subprocess.run(["xcrun", "--find", "coremlcompiler"], capture_output=True, text=True)
    return probe.returncode == 0


def default_compiler() -> Compiler:
    """`xcrun coremlcompiler` when installed, else coremltools' compile_model (macOS 15+)."""
    require_macos("compiling a Core ML package (.mlpackage -> .mlmodelc)", MIN_MACOS)
    if _has_xcrun_coremlcompiler():
        return Compiler("xcrun coremlcompiler", _xcrun_compile)
    return Compiler("coremltools.compile_model", _coremltools_compile)


def compiled_path_for(package: Path, out_dir: Path | None = None) -> Path:
    """Where `package` compiles to: `<out_dir or the package's folder>/<stem>.mlmodelc`."""
    package = Path(package)
    return (Path(out_dir) if out_dir is not None else package.parent) / (package.stem + ".mlmodelc")


def sidecar_path(compiled: Path) -> Path:
    compiled = Path(compiled)
    return compiled.with_name(compiled.name + SIDECAR_SUFFIX)


def read_sidecar(compiled: Path) -> dict[str, Any] | None:
    """The recorded source of a compiled model, or None if absent or unreadable."""
    path = sidecar_path(compiled)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        return None
    return data


def is_up_to_date(compiled: Path, source_sha256: str) -> bool:
    """True if `compiled` exists and its sidecar records a package with this digest."""
    if not Path(compiled).is_dir():
        return False
    data = read_sidecar(compiled)
    return data is not None and data.get("source_sha256") == source_sha256


def compile_to(
    package: Path, dest: Path, compiler: Compiler | None = None, overwrite: bool = False
) -> str:
    """Compile `package` into the folder `dest` atomically (no sidecar); return the compiler."""
    package, dest = Path(package), Path(dest)
    if dest.suffix != ".mlmodelc":
        raise CompileError(f"{dest}: the compiled model's path must end in .mlmodelc")
    compiler = compiler or default_compiler()
    with atomic_path(dest, overwrite=overwrite) as tmp:
        compiler.run(package, tmp)
        if not tmp.is_dir():
            raise CompileError(f"{compiler.name} reported success but wrote no {dest.name}")
    return compiler.name


def compile_package(
    pkg: Path,
    out_dir: Path | None = None,
    overwrite: bool = False,
    *,
    compiler: Compiler | None = None,
) -> CompileResult:
    """Compile one .mlpackage to `<out_dir>/<stem>.mlmodelc`, unless it is already up to date.

    Up to date means the sidecar beside the compiled folder records this package's sha256;
    `overwrite` recompiles regardless. A compiled folder with a stale or missing sidecar is
    recompiled and replaced atomically.

    Raises:
        PlatformError: not macOS 15+ (and no `compiler` was given).
        PackageError: `pkg` is missing or not a complete .mlpackage.
        CompileError: the compiler failed; carries its own message in `.stderr`.
    """
    t0 = time.perf_counter()
    compiler = compiler or default_compiler()
    pkg = check_package(pkg)
    dest = compiled_path_for(pkg, out_dir)
    sha = sha256_tree(pkg)
    if not overwrite and is_up_to_date(dest, sha):
        log.info("%s is up to date with %s", dest, pkg)
        recorded = read_sidecar(dest) or {}
        return CompileResult(
            pkg, dest, sha, True, str(recorded.get("compiler", "")), time.perf_counter() - t0
        )
    # Drop the old sidecar first: a crash between the two writes below must leave no
    # sidecar vouching for a compiled model it does not describe.
    sidecar_path(dest).unlink(missing_ok=True)
    name = compile_to(pkg, dest, compiler, overwrite=True)
    record = {
        "schema": SIDECAR_SCHEMA,
        "package": str(pkg.resolve()),  # absolute: residency and the runner find it from anywhere
        "source_sha256": sha,
        "compiler": name,
    }
    atomic_write_json(sidecar_path(dest), record)
    return CompileResult(pkg, dest, sha, False, name, time.perf_counter() - t0)
