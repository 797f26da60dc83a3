"""Reading a saved .mlpackage back: its spec, its ML Program, its integrity.

A corrupt package (missing Manifest.json, truncated weight file) is a PackageError with a
one-line reason, never a traceback from deep inside coremltools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anechain.errors import PackageError

_MODEL_REL = Path("Data/com.apple.CoreML/model.mlmodel")
_WEIGHTS_REL = Path("Data/com.apple.CoreML/weights")


def check_package(path: str | Path) -> Path:
    """Check the package's folder structure; return its path."""
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path} does not exist")
    if not path.is_dir() or path.suffix != ".mlpackage":
        raise PackageError(f"{path} is not an .mlpackage folder")
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise PackageError(f"{path} is corrupt: Manifest.json is missing")
    try:
        entries = json.loads(manifest.read_text())["itemInfoEntries"]
    except (ValueError, KeyError) as exc:
        raise PackageError(f"{path} is corrupt: Manifest.json is unreadable ({exc})") from None
    for entry in entries.values():
        item = path / "Data" / entry["path"]
        if not item.exists():
            raise PackageError(f"{path} is corrupt: {entry['path']} is missing")
    if not (path / _MODEL_REL).is_file():
        raise PackageError(f"{path} is corrupt: {_MODEL_REL} is missing")
    return path


def load_spec(path: str | Path) -> Any:
    """The package's protobuf spec (small: weights stay in the weight file)."""
    from coremltools.models.utils import load_spec as ct_load_spec

    path = check_package(path)
    try:
        return ct_load_spec(str(path))
    except Exception as exc:  # coremltools raises bare Exceptions for bad protobufs
        raise PackageError(f"{path} is corrupt: cannot read its model spec ({exc})") from None


def load_program(
    path: str | Path, function: str | None = None, spec: Any = None
) -> tuple[Any, Any]:
    """(spec, MIL Program) of a package, via coremltools' own milproto loader.

    Quantized weights stay as constexpr ops; their values materialize lazily. `function`
    loads that one function only: the loader reads every const of every function it is given
    into memory, and a multifunction shard's functions each hold the whole weight set (for a
    full-size 8-layer INT8 shard, 0.8 GB a function). `spec`: the package's spec, when the
    caller has read it already.
    """
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = load_spec(path) if spec is None else spec
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{path} is not an ML Program")
    model_spec = spec
    if function is not None:
        names = sorted(spec.mlProgram.functions)
        if function not in names:
            raise PackageError(
                f"{path}: the program has no {function!r} function (it has {', '.join(names)})"
            )
        model_spec = type(spec)()
        model_spec.CopyFrom(spec)  # the spec is small: its weights are in the weight file
        for name in names:
            if name != function:
                del model_spec.mlProgram.functions[name]
    weights_dir = Path(path) / _WEIGHTS_REL
    try:
        prog = milproto_load(
            model_spec=model_spec,
            specification_version=spec.specificationVersion,
            file_weights_dir=str(weights_dir),
        )
    except Exception as exc:  # truncated weight blobs surface as assorted errors
        raise PackageError(f"{path} is corrupt: cannot load its program ({exc})") from None
    return spec, prog


def user_metadata(spec: Any) -> dict[str, str]:
    return dict(spec.description.metadata.userDefined)


def package_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
