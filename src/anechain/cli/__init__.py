"""The `anechain` command line: the only package that imports click.

Each command parses its options, builds a typed config, calls one library function and
renders the result. Library errors become one line in one place, `AnechainGroup.invoke`:
exit 2 for a UsageError (like click's own usage errors), 1 for any other AnechainError or
OSError; never a traceback. SIGTERM and SIGHUP unwind like Ctrl-C, so work folders are
removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

from anechain import __version__
from anechain.errors import AnechainError, UsageError


def one_line(text: str) -> str:
    """Messages are one line: a library's multi-line text is joined."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line naming the path: shutil's list of (src, dst, why) included."""
    from anechain.fsutil import disk_full_error, shutil_error_entries

    entries = shutil_error_entries(exc)
    if entries:
        src, dst, why = entries[0]
        more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
        return one_line(f"cannot copy {src} to {dst}: {why}{more}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename:
        return str(disk_full_error(Path(exc.filename), exc, None, None))
    where = f": {exc.filename}" if exc.filename else ""
    return one_line(f"{exc.strerror or exc}{where}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is so that `finally` blocks clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# Signals that end a run and can be caught (SIGKILL cannot: the next run sweeps).
_UNWIND_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in _UNWIND_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class AnechainGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            with _signals_unwind():
                return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(one_line(str(exc))) from None
        except AnechainError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except OSError as exc:  # a path the user gave: missing folder, no permission, full disk
            raise click.ClickException(describe_os_error(exc)) from None
        except MemoryError:  # an allocation no up-front check foresaw
            raise click.ClickException(
                "out of memory; a smaller --context or fewer layers per shard need less"
            ) from None
        except RecursionError:  # a reader without jsonio.loads_json met a deeply nested file
            raise click.ClickException(
                "an input file is nested too deeply to read (Python's recursion limit)"
            ) from None
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
            click.echo("interrupted; nothing half-written was left behind", err=True)
            sys.exit(128 + signum)


@click.group(cls=AnechainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anechain")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Turn a Phi-4-mini checkpoint into fused, stateful, INT8 Core ML shards for the
    Apple Neural Engine, and prove each shard before it ships.

    \b
    The whole pipeline on the tiny default (random checkpoint), in one command:
      anechain build
    Step by step:
      anechain random-checkpoint artifacts/ckpt --preset tiny
      anechain export --model artifacts/ckpt --config configs/tiny.yaml \\
          --layer-spec 0:3:artifacts/layers_0_3.mlpackage \\
          --layer-spec 3:6:artifacts/layers_3_6.mlpackage \\
          --head artifacts/head.mlpackage --embedding artifacts/embedding.npy
      anechain validate shard artifacts/layers_0_3.mlpackage --model artifacts/ckpt
      (and likewise layers_3_6 and the head)
      anechain compile artifacts/*.mlpackage                  (macOS)
      anechain manifest build artifacts/*.mlpackage --embedding artifacts/embedding.npy \\
          -o artifacts/manifest.json
      anechain generate --manifest artifacts/manifest.json --prompt-ids 1,2,3
    """
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if verbose == 0:
        # Converter progress bars and library chatter are noise next to our own progress.
        os.environ.setdefault("TQDM_DISABLE", "1")
        warnings.filterwarnings("ignore", module=r"coremltools\..*")
        warnings.filterwarnings("ignore", module=r"torch\..*")
        for noisy in ("coremltools", "torch", "transformers"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass


def _register() -> None:
    from anechain.cli import checkpoint as _checkpoint
    from anechain.cli import export as _export
    from anechain.cli import macos as _macos
    from anechain.cli import manifest as _manifest
    from anechain.cli import plan as _plan
    from anechain.cli import run as _run
    from anechain.cli import validate as _validate

    for module in (_checkpoint, _export, _validate, _macos, _manifest, _run, _plan):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()
