"""A full disk, named: on a small real tmpfs, every write that fills it ends in one
"no space left" line naming the path and the space needed, leaves nothing half-written,
and an --overwrite leaves the old output byte-identical.

Needs root (mount); skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from anechain.cli import cli
from anechain.fsutil import sha256_tree

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def disk(tmp_path: Path):
    """A 2 MB tmpfs, unmounted after the test."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if run.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {run.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def _leave(disk: Path, free: int) -> None:
    """Fill the disk up to about `free` bytes left."""
    now = shutil.disk_usage(disk).free
    with open(disk / f"filler{len(list(disk.iterdir()))}", "wb") as f:
        f.write(b"\0" * max(now - free, 0))


def _entries(disk: Path) -> set[str]:
    return {p.name for p in disk.iterdir() if not p.name.startswith("filler")}


def _export(checkpoint: Path, dest: Path, *extra: str):
    return CliRunner().invoke(
        cli,
        [
            "export",
            "--model",
            str(checkpoint),
            "--config",
            TINY,
            "--layer-spec",
            f"0:6:{dest}",
            *extra,
        ],
    )


def test_export_new_package(disk: Path, tiny_checkpoint_dir: Path, error_line) -> None:
    """coremltools' MIL FileWriter fails without saying why; the disk is named."""
    _leave(disk, 300_000)
    dest = disk / "a.mlpackage"
    line = error_line(_export(tiny_checkpoint_dir, dest), 1)
    assert line.startswith(f"no space left on device writing {dest}: needs at least ")
    assert "free on its filesystem" in line
    assert _entries(disk) == set()  # no package, no work folder


def test_export_overwrite_keeps_the_old_package(
    disk: Path, tiny_checkpoint_dir: Path, error_line
) -> None:
    dest = disk / "a.mlpackage"
    run = _export(tiny_checkpoint_dir, dest, "--quantization", "none")
    assert run.exit_code == 0, run.output
    before = sha256_tree(dest)
    _leave(disk, 300_000)
    run = _export(tiny_checkpoint_dir, dest, "--overwrite")
    line = error_line(run, 1)  # also: no "Exception ignored" traceback on stderr
    assert line.startswith(f"no space left on device writing {dest}: needs at least ")
    assert "Exception ignored" not in run.stderr
    assert sha256_tree(dest) == before
    assert _entries(disk) == {"a.mlpackage"}


def test_random_checkpoint(disk: Path, error_line) -> None:
    out = disk / "ck"
    _leave(disk, 100_000)
    run = CliRunner().invoke(cli, ["random-checkpoint", str(out), "--preset", "tiny"])
    line = error_line(run, 1)
    # 6 layers + the tied embedding of the tiny preset, bf16: 509.6 KB (exact, told ahead).
    assert line.startswith(f"no space left on device writing {out}: needs 509.6 KB, ")
    assert _entries(disk) == set()


def test_random_checkpoint_overwrite(disk: Path, error_line) -> None:
    out = disk / "ck"
    run = CliRunner().invoke(cli, ["random-checkpoint", str(out), "--preset", "tiny"])
    assert run.exit_code == 0, run.output
    before = sha256_tree(out)
    _leave(disk, 100_000)
    run = CliRunner().invoke(
        cli, ["random-checkpoint", str(out), "--preset", "tiny", "--seed", "1", "--overwrite"]
    )
    assert "no space left on device writing" in error_line(run, 1)
    assert sha256_tree(out) == before


def test_import(disk: Path, tmp_path: Path, error_line) -> None:
    from tests.test_import import _tiny_llama

    _tiny_llama(tmp_path / "llama")
    out = disk / "imp"
    _leave(disk, 100_000)
    run = CliRunner().invoke(cli, ["import", str(tmp_path / "llama"), str(out)])
    line = error_line(run, 1)
    assert line.startswith(f"no space left on device writing {out}: needs 156.3 KB, ")
    assert _entries(disk) == set()
    # float32 needs twice as much: the figure is the real need, not a constant.
    run = CliRunner().invoke(
        cli, ["import", str(tmp_path / "llama"), str(out), "--dtype", "float32"]
    )
    assert "needs 312.6 KB" in error_line(run, 1)


FILE_WRITER = "[MIL FileWriter]: Unknown error occurred while writing data to the file."


def test_coremltools_tmpdir_is_named_when_it_fills(disk: Path, tmp_path: Path, monkeypatch) -> None:
    """coremltools writes its weights and spec through `tempfile` (TMPDIR) first; when that
    filesystem is the full one, the error names it, not the output."""
    from anechain.fsutil import filled_by

    dest = tmp_path / "out" / "a.mlpackage"
    dest.parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    _leave(disk, 50_000)
    err = filled_by(RuntimeError(FILE_WRITER), dest, 1_000_000)
    assert err is not None
    assert str(err).startswith(
        f"no space left on device writing coremltools' temporary files in {disk} (TMPDIR) "
        f"for {dest}: needs about 1.0 MB, "
    )
    # The same error with room on both filesystems is not a full disk: not renamed.
    assert filled_by(RuntimeError(FILE_WRITER), dest, 10_000) is None
    # An explicit ENOSPC: the fuller filesystem is named.
    full = filled_by(OSError(28, os.strerror(28)), dest, None)
    assert full is not None and "(TMPDIR)" in str(full)


def test_export_keeps_coremltools_temp_files_beside_the_output(
    disk: Path, tiny_checkpoint_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A full TMPDIR does not stop an export: its temporary files go to the work folder
    beside the package (fsutil.scratch_tempdir), on the output's filesystem."""
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    _leave(disk, 0)
    run = _export(tiny_checkpoint_dir, tmp_path / "a.mlpackage")
    assert run.exit_code == 0, run.output
    assert (tmp_path / "a.mlpackage").is_dir()
