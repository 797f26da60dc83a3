"""Pieces shared by the command modules: param types, config loading, progress."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from anechain.config import Config, LayerRange, load_config, load_preset
from anechain.errors import ConfigError
from anechain.fsutil import human_size as human_bytes  # noqa: F401  (the commands' name)
from anechain.runners import BACKENDS

_S = TypeVar("_S")
_ASCII_SIGNED_INT = re.compile(r"[+-]?[0-9]+")


class LayerSpecType(click.ParamType):
    """START:END:PATH, e.g. 8:16:artifacts/layers_8_16.mlpackage."""

    name = "START:END:PATH"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from anechain.export import LayerSpec

        if isinstance(value, LayerSpec):
            return value
        start, sep1, rest = str(value).partition(":")
        end, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and path):
            self.fail(f"{value!r} is not START:END:PATH (e.g. 0:8:a.mlpackage)", param, ctx)
        try:
            layers = LayerRange.parse(f"{start}:{end}")
        except ConfigError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)
        if not path.endswith(".mlpackage"):
            self.fail(f"{value!r}: PATH must end in .mlpackage", param, ctx)
        return LayerSpec(layers, Path(path))


class AsciiIntRange(click.IntRange):
    """click.IntRange over ASCII digits only: int() would also take "١٦" (16) silently."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, str) and not _ASCII_SIGNED_INT.fullmatch(value.strip()):
            self.fail(f"{value!r} is not an integer (ASCII digits)", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloat(click.ParamType):
    """A finite float (a NaN bound passes nothing and is not valid JSON), optionally > above."""

    name = "FLOAT"

    def __init__(self, above: float | None = None) -> None:
        self.above = above

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from anechain.config import parse_ascii_float

        number = parse_ascii_float(value) if isinstance(value, str) else value
        if number is None or not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number (ASCII digits)", param, ctx)
        if self.above is not None and not number > self.above:
            self.fail(f"{value!r} is not above {self.above:g}", param, ctx)
        return number


def check_outputs(*paths: Path | None, folders: tuple[Path, ...] = ()) -> None:
    """Before any work: recover what an interrupted run left at each output, and refuse
    outputs that cannot be written (sockets, block devices, a stream where a folder must
    go; exit 2). Streams (/dev/null, /dev/stdout, FIFOs) are written to in place."""
    from anechain.fsutil import recover, writes_in_place

    for path, folder in [*((p, False) for p in paths), *((p, True) for p in folders)]:
        if path is not None and not writes_in_place(path, folder):
            recover(path)


class InputFile(click.Path):
    """An existing file read whole: a device (/dev/zero, /dev/urandom) would never end, so
    only regular files and pipes (/dev/stdin piped) are taken."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, exists=True, dir_okay=False)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        import os
        import stat

        path = super().convert(value, param, ctx)
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            self.fail(f"{value} is a device or socket, not a file", param, ctx)
        return path


class LayerRangeType(click.ParamType):
    name = "START:END"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, LayerRange):
            return value
        try:
            return LayerRange.parse(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def model_option(
    help: str = "Hugging Face checkpoint folder (config.json + safetensors).",
    required: bool = True,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """`--model DIR`, an existing checkpoint folder, passed as `model_dir`."""
    return click.option(
        "--model",
        "model_dir",
        required=required,
        type=click.Path(path_type=Path, exists=True, file_okay=False),
        help=help,
    )


def config_option(help: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """`--config FILE`, an anechain YAML config, passed as `config_path`."""
    return click.option("--config", "config_path", type=InputFile(), help=help)


# Shared by validate, plan, build and generate, so they say the same thing.
backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="What runs the shards. mil: fp16 reference interpreter over the saved programs "
    "(any OS); coreml: the compiled models in Core ML (macOS 15+); auto: coreml on macOS.",
)
cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where golden reference tensors are cached (default ~/.cache/anechain or "
    "$ANECHAIN_CACHE_DIR).",
)
report_only_option = click.option(
    "--report-only",
    is_flag=True,
    help="Count residency but do not gate on it (Macs without a Neural Engine, e.g. hosted CI).",
)


def resolve_config(config_path: Path | None, preset: str | None = None) -> Config:
    """The config file if given, else the named preset, else Phi-4-mini's defaults."""
    if config_path is not None:
        return load_config(config_path)
    return load_preset(preset or "phi-4-mini")


def with_options(settings: _S, **given: tuple[str, Any]) -> _S:
    """`settings` with the values the command line gave (field=(option, value); None: not
    given). A value the settings refuse is a usage error naming its option (exit 2)."""
    for name, (option, value) in given.items():
        if value is None:
            continue
        try:
            settings = dataclasses.replace(settings, **{name: value})  # type: ignore[type-var]
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    return settings


def progress_printer() -> Callable[[str], None]:
    """Progress lines on stderr, each stamped with the time since the command started."""
    t0 = time.perf_counter()

    def say(message: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {message}", err=True)

    return say


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
