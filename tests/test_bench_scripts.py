"""The benchmarks end a bad input like the CLI does: one line on stderr, exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("bench_depth.py", ["--model", "{missing}"], "checkpoint folder"),
        ("bench_sensitivity.py", ["--model", "{missing}"], "checkpoint folder"),
        (
            "bench_validate_stream.py",
            ["--model", "{missing}", "--package", "{missing}/s.mlpackage"],
            "does not exist",
        ),
    ],
)
def test_a_bad_input_ends_a_benchmark_with_one_line(tmp_path, script, args, says):
    missing = str(tmp_path / "missing")
    argv = [a.format(missing=missing) for a in args]
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *argv], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last and missing in last
