"""The `anechain` command line: the only package that imports click.

Each command parses its options, builds a typed config, calls one library function and
renders the result. Library errors (AnechainError) become a one-line message and exit 1 in
one place, `AnechainGroup.invoke`; usage errors exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from anechain import __version__
from anechain.errors import AnechainError


class AnechainGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AnechainError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a path the user gave: missing folder, no permission, full disk
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left behind", err=True)
            sys.exit(130)


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
