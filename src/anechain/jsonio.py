"""Strict JSON for every file anechain writes or reads.

Python's json writes NaN and Infinity as bare tokens, which strict readers (jq, browsers,
other languages) refuse: values that are not finite are written as null instead. Reading
turns every failure, deep nesting included, into a ValueError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from anechain.fsutil import atomic_write_text


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-Inf; numpy's too) replaced by None."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        try:
            f = float(value)
        except (TypeError, ValueError):
            return value
        return f if math.isfinite(f) else None
    return value


def loads_json(text: str | bytes) -> Any:
    """json.loads whose every failure is a ValueError: deep nesting (RecursionError) too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def dumps_json(data: Any, indent: int | None = 2, sort_keys: bool = True) -> str:
    """Strict JSON (no bare NaN/Infinity: strict readers refuse them), finite-or-null."""
    return json.dumps(finite_or_null(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_json(
    dest: str | Path,
    data: Any,
    indent: int | None = 2,
    sort_keys: bool = True,
    overwrite: bool = True,
) -> None:
    """Write `data` as strict JSON (see `dumps_json`), atomically."""
    atomic_write_text(dest, dumps_json(data, indent, sort_keys) + "\n", overwrite=overwrite)
