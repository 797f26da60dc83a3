"""Outputs under stress: special files, a full disk, and runs interrupted at every step.

Interrupted runs are real child processes killed (SIGKILL, SIGTERM) at a controlled point
chosen by a patch inside the child; the next run must recover or sweep what they left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import anechain.fsutil as fsutil
from anechain.cli import cli, describe_os_error
from anechain.config import LayerRange, preset_path
from anechain.errors import DiskFullError
from anechain.fsutil import atomic_path, recover, sha256_tree, work_folder

TINY = str(preset_path("tiny"))
SRC = str(Path(fsutil.__file__).parents[1])


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial"))


@pytest.fixture
def package(tiny_shards, tmp_path) -> Path:
    """A copy of a real exported package, as the existing output of an overwrite."""
    dest = tmp_path / "out" / "layers_0_1.mlpackage"
    shutil.copytree(tiny_shards[LayerRange(0, 3)], dest)
    return dest


# --- special files --------------------------------------------------------------------------


def test_a_fifo_is_written_in_place_but_never_takes_a_package(
    tiny_checkpoint_dir, tmp_path, error_line
):
    fifo = tmp_path / "summary.json"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--embedding", tmp_path / "e.npy", "--json", fifo
    )
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the FIFO, not replaced by a file
    assert json.loads(received[0])[0]["kind"] == "embedding"
    for overwrite in ([], ["--overwrite"]):
        pkg = tmp_path / "p.mlpackage"
        os.mkfifo(pkg)
        result = invoke(
            "export", "--model", tiny_checkpoint_dir, "--layer-spec", f"0:1:{pkg}", *overwrite
        )
        assert "is a stream, not a place a folder can be written" in error_line(result, 2)
        assert stat.S_ISFIFO(os.stat(pkg).st_mode)
        pkg.unlink()
    assert partials(tmp_path) == []


def test_a_socket_output_is_refused_before_any_work(tiny_checkpoint_dir, tmp_path, error_line):
    path = tmp_path / "s.json"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        result = invoke(
            "export", "--model", tiny_checkpoint_dir, "--embedding", tmp_path / "e.npy",
            "--json", path,
        )  # fmt: skip
        assert "is a socket; outputs must be regular files" in error_line(result, 2)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert not (tmp_path / "e.npy").exists()


def test_dev_null_is_written_in_place_never_replaced(tiny_checkpoint_dir, tmp_path):
    before = os.stat("/dev/null")
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--embedding", tmp_path / "e.npy",
        "--json", "/dev/null",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino
    assert not list(Path("/dev").glob(".null.*"))


def test_dev_stdout_receives_the_json(tiny_checkpoint_dir, tmp_path):
    run = subprocess.run(
        [
            sys.executable, "-m", "anechain", "export", "--model", str(tiny_checkpoint_dir),
            "--embedding", str(tmp_path / "e.npy"), "--json", "/dev/stdout",
        ],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert '"kind": "embedding"' in run.stdout


def test_device_refuses_a_folder(tmp_path):
    from anechain.errors import OutputPathError

    with pytest.raises(OutputPathError, match="a folder cannot be written to it"):
        with atomic_path("/dev/null", overwrite=True) as tmp:
            tmp.mkdir()


# --- a full disk ----------------------------------------------------------------------------


def _enospc(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else None)


def test_a_full_disk_names_the_package_and_the_space_it_needed(
    tiny_checkpoint_dir, package, monkeypatch, error_line
):
    import contextlib

    import anechain.export as export_module

    before = sha256_tree(package)
    real = export_module.atomic_path

    @contextlib.contextmanager
    def fills_up(dest, *args, **kwargs):  # type: ignore[no-untyped-def]
        # The package is written, then its last write finds the disk full (as a converter
        # reports it: wrapped in its own error).
        with real(dest, *args, **kwargs) as tmp:
            yield tmp
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "weight.bin"))
            except OSError as exc:
                raise RuntimeError(f"saving failed: {exc}") from exc

    monkeypatch.setattr(export_module, "atomic_path", fills_up)
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", TINY,
        "--layer-spec", f"0:1:{package}", "--overwrite",
    )  # fmt: skip
    message = error_line(result, 1)
    assert message.startswith(f"no space left on device writing {package}: needs more than ")
    assert "KB written when it filled, " in message and "free on its filesystem" in message
    assert ".partial" not in message  # the user's path, not our work folder's
    monkeypatch.undo()
    assert sha256_tree(package) == before
    assert partials(package.parent) == []


def test_a_full_disk_writing_json(tiny_checkpoint_dir, tmp_path, monkeypatch, error_line):
    summary = tmp_path / "summary.json"
    summary.write_text("[]\n")
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--embedding", tmp_path / "e.npy",
        "--json", summary, "--overwrite",
    )  # fmt: skip
    message = error_line(result, 1)
    assert f"no space left on device writing {summary}: needs " in message
    assert summary.read_text() == "[]\n" and partials(tmp_path) == []


def test_other_copy_errors_are_one_line():
    exc = shutil.Error([("a/x", "b/x", "[Errno 13] Permission denied"), ("a/y", "b/y", "e")])
    assert describe_os_error(exc) == (
        "cannot copy a/x to b/x: [Errno 13] Permission denied (and 1 more)"
    )


def test_disk_full_from_copytree_reports_the_source_size(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 5000)
    monkeypatch.setattr(shutil, "copyfile", _enospc)
    with pytest.raises(DiskFullError, match=r"writing .*dst: needs 5.0 KB, "):
        with atomic_path(tmp_path / "dst") as tmp:
            shutil.copytree(src, tmp)
    assert partials(tmp_path) == []


# --- work folders and recovery --------------------------------------------------------------


def test_folder_replacement_is_one_swap(tmp_path, monkeypatch):
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "v").write_text("old")
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    with atomic_path(dest, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "v").write_text("new")
    assert (dest / "v").read_text() == "new" and partials(tmp_path) == []
    if sys.platform.startswith("linux"):
        assert renames == []  # renameat2(RENAME_EXCHANGE): no moment without `dest`


def test_a_live_work_folder_is_never_swept(tmp_path):
    dest = tmp_path / "p"
    with work_folder(dest) as live:
        (live / "x").write_text("in use")
        recover(dest)  # another run's sweep
        assert (live / "x").read_text() == "in use"
    assert not live.exists()


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EACCES])
def test_a_filesystem_without_locks_still_writes_and_sweeps_nothing(tmp_path, monkeypatch, err):
    # Some network/FUSE mounts refuse flock (ENOLCK, ...): a write must neither loop forever
    # making work folders nor sweep one it cannot tell is stale.
    import fcntl

    def no_flock(fd, op):  # type: ignore[no-untyped-def]
        raise OSError(err, os.strerror(err))

    made = []
    real_mkdir = os.mkdir

    def mkdir(path, *args):  # type: ignore[no-untyped-def]
        made.extend([path] if str(path).endswith(".partial") else [])
        if len(made) > 3:
            raise AssertionError("work folders made in a loop")
        real_mkdir(path, *args)

    other = tmp_path / ".out.json.0123456789ab.partial"  # maybe another run's, live
    other.mkdir()
    (other / "out.json").write_text("in use")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "out.json").read_text() == "{}" and len(made) == 1
    assert (other / "out.json").read_text() == "in use"


def test_a_work_folder_swept_before_its_check_is_made_again(tmp_path, monkeypatch):
    # Another run's sweep removed the new folder between our lock and the samestat check.
    import anechain.fsutil as fsutil

    real, calls = fsutil._try_lock, []

    def lock_then_swept(path):  # type: ignore[no-untyped-def]
        fd = real(path)
        calls.append(path)
        if len(calls) == 1:
            os.rmdir(path)
        return fd

    monkeypatch.setattr(fsutil, "_try_lock", lock_then_swept)
    with work_folder(tmp_path / "p") as work:
        assert work.is_dir() and work == calls[-1] and len(calls) == 2
    assert partials(tmp_path) == []


def test_recover_restores_only_a_missing_destination(tmp_path):
    dest = tmp_path / "p"
    stale = tmp_path / ".p.deadbeef.partial"
    (stale / "p.old").mkdir(parents=True)
    (stale / "p.old" / "v").write_text("old")
    recover(dest)
    assert (dest / "v").read_text() == "old" and not stale.exists()
    # With `dest` present, a stale `.old` is the previous copy of a finished swap: dropped.
    (stale / "p.old").mkdir(parents=True)
    recover(dest)
    assert (dest / "v").read_text() == "old" and not stale.exists()


def test_writing_any_output_sweeps_its_folder(tmp_path):
    # Left by a run killed mid-swap on another output in the same folder.
    stale = tmp_path / ".emb.npy.0123456789ab.partial"
    stale.mkdir()
    (stale / "emb.npy.old").write_text("old table")
    (stale / "emb.npy").write_text("half a new table")
    foreign = tmp_path / ".notes.partial"  # not ours: never touched
    foreign.mkdir()
    with atomic_path(tmp_path / "summary.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "emb.npy").read_text() == "old table" and not stale.exists()
    assert foreign.is_dir()


def test_an_interrupt_while_the_work_folder_is_created_leaves_nothing(
    tiny_checkpoint_dir, tmp_path, monkeypatch
):
    real = os.mkdir

    def mkdir(path, *args):  # type: ignore[no-untyped-def]
        real(path, *args)
        if str(path).endswith(".partial"):
            raise KeyboardInterrupt  # Ctrl-C right after the folder exists

    monkeypatch.setattr(os, "mkdir", mkdir)
    result = invoke("export", "--model", tiny_checkpoint_dir, "--embedding", tmp_path / "e.npy")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert "Traceback" not in result.output
    assert partials(tmp_path) == [] and not (tmp_path / "e.npy").exists()


# --- real processes killed at a controlled point ------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    import anechain.fsutil as fsutil

    point, sig = sys.argv[1], getattr(signal, sys.argv[2])

    def die():
        os.kill(os.getpid(), sig)
        time.sleep(60)  # SIGTERM is handled: unwinding starts here

    if point == "between-renames":  # a filesystem without an atomic swap
        fsutil._exchange = lambda a, b: False
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith(".old"):
                die()
        os.replace = replace
    elif point == "after-swap":
        real_exchange = fsutil._exchange
        def exchange(a, b):
            done = real_exchange(a, b)
            die()
        fsutil._exchange = exchange
    elif point == "in-convert":  # coremltools has just made a temporary folder
        import tempfile
        real_mkdtemp = tempfile.mkdtemp
        def mkdtemp(*args, **kwargs):
            made = real_mkdtemp(*args, **kwargs)
            if (tempfile.tempdir or "").endswith(".partial"):  # inside an export
                die()
            return made
        tempfile.mkdtemp = mkdtemp
    elif point == "in-write":  # a checkpoint half-written in its work folder
        import safetensors.torch
        safetensors.torch.save_file = lambda *a, **k: die()

    from anechain.cli import cli
    cli(sys.argv[3:], prog_name="anechain")
    """
)


def run_child(point: str, sig: str, args: list[str | Path], tmpdir: Path) -> int:
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": SRC, "TMPDIR": str(tmpdir)}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, point, sig, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    return run.returncode


def export_args(ckpt: Path, dest: Path) -> list[str | Path]:
    return ["export", "--model", ckpt, "--config", TINY, "--layer-spec", f"0:1:{dest}"]


def test_sigkill_between_the_two_renames_is_recovered(
    tiny_checkpoint_dir, package, tmp_path, error_line
):
    before = sha256_tree(package)
    rc = run_child(
        "between-renames", "SIGKILL", [*export_args(tiny_checkpoint_dir, package), "--overwrite"],
        tmp_path / "tmpdir",
    )  # fmt: skip
    assert rc == -signal.SIGKILL
    assert not package.exists()  # the old copy is stranded inside the work folder
    (stranded,) = package.parent.glob(f".*.partial/{package.name}.old")
    assert sha256_tree(stranded) == before
    # The next run restores it before anything else: here it then refuses to overwrite.
    result = invoke(*export_args(tiny_checkpoint_dir, package))
    assert "pass --overwrite" in error_line(result, 2)
    assert sha256_tree(package) == before and partials(package.parent) == []


def test_sigkill_after_the_swap_leaves_the_new_package_and_a_sweepable_old(tmp_path, error_line):
    ckpt = tmp_path / "ckpt"
    assert invoke("random-checkpoint", ckpt, "--seed", "1").exit_code == 0
    before = sha256_tree(ckpt)
    rc = run_child(
        "after-swap", "SIGKILL", ["random-checkpoint", ckpt, "--seed", "2", "--overwrite"],
        tmp_path / "tmpdir",
    )  # fmt: skip
    assert rc == -signal.SIGKILL
    assert sha256_tree(ckpt) != before  # the new one is in place, complete
    assert len(partials(tmp_path)) == 1  # holding the old one (a whole copy)
    result = invoke("random-checkpoint", ckpt, "--seed", "2")
    assert "already exists" in error_line(result, 2)
    assert partials(tmp_path) == []


def test_a_killed_export_leaves_nothing_in_tmpdir(tiny_checkpoint_dir, package, tmp_path):
    before = sha256_tree(package)
    tmpdir = tmp_path / "tmpdir"
    args = [*export_args(tiny_checkpoint_dir, package), "--overwrite"]
    assert run_child("in-convert", "SIGKILL", args, tmpdir) == -signal.SIGKILL
    assert list(tmpdir.iterdir()) == []  # coremltools' folder was made in our work folder
    assert sha256_tree(package) == before
    left = partials(package.parent)  # the export's scratch (and the save's, if begun)
    assert any(p.is_dir() for w in left for p in w.iterdir())  # what coremltools had started
    result = invoke(*args)  # the next run sweeps them, then exports
    assert result.exit_code == 0, result.output
    assert partials(package.parent) == [] and sha256_tree(package) != before


def test_sigterm_cleans_up_on_the_way_out(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert invoke("random-checkpoint", ckpt, "--seed", "1").exit_code == 0
    before = sha256_tree(ckpt)
    tmpdir = tmp_path / "tmpdir"
    args = ["random-checkpoint", ckpt, "--seed", "2", "--overwrite"]
    assert run_child("in-write", "SIGTERM", args, tmpdir) == 128 + signal.SIGTERM
    assert sha256_tree(ckpt) == before
    assert partials(tmp_path) == [] and list(tmpdir.iterdir()) == []


def test_an_output_path_that_is_not_utf8_is_a_usage_error(
    tiny_checkpoint_dir, tmp_path, error_line
):
    # How Python hands over argv bytes the locale cannot decode (surrogateescape).
    bad = tmp_path / "sub" / "\udcff.mlpackage"
    result = invoke("export", "--model", tiny_checkpoint_dir, "--layer-spec", f"0:1:{bad}")
    assert "is not a UTF-8 path" in error_line(result, 2)
    assert not (tmp_path / "sub").exists()


def test_a_failed_export_leaves_no_new_folders(
    tiny_checkpoint_dir, tmp_path, monkeypatch, error_line
):
    import anechain.checkpoint as checkpoint_module

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise checkpoint_module.CheckpointError("simulated failure after the work folder exists")

    monkeypatch.setattr(checkpoint_module.Checkpoint, "read_tensors", fail)
    dest = tmp_path / "new" / "deeper" / "a.mlpackage"
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", TINY, "--layer-spec", f"0:1:{dest}"
    )
    assert "simulated failure" in error_line(result, 1)
    assert not (tmp_path / "new").exists()


def _socket_at(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("ckpt", lambda ck, b, out: ["random-checkpoint", out]),
        ("e.npy", lambda ck, b, out: ["export", "--model", ck, "--embedding", out]),
        ("s.mlpackage", lambda ck, b, out: ["export", "--model", ck, "--layer-spec", f"0:1:{out}"]),
        ("r.json", lambda ck, b, out: [
            "validate", "shard", b / "layers_0_3.mlpackage", "--model", ck, "--report", out,
        ]),
        ("m.json", lambda ck, b, out: ["manifest", "build", b / "layers_0_3.mlpackage", "-o", out]),
        ("s.json", lambda ck, b, out: ["build", "--model", ck, "--out", b, "--json", out]),
        ("m.json", lambda ck, b, out: ["plan", "--model", ck, "--report-dir", b / "p", "-o", out]),
        ("layers_0_3.mlmodelc", lambda ck, b, out: [
            "compile", b / "layers_0_3.mlpackage", "--out", out.parent,
        ]),
        ("layers_0_3.capture.json", lambda ck, b, out: [
            "capture", b / "layers_0_3.mlpackage", "--model", ck, "--out", out.parent,
        ]),
    ],
    ids=["random-checkpoint", "export-embedding", "export-shard", "validate", "manifest",
         "build", "plan", "compile", "capture"],
)  # fmt: skip
def test_every_command_refuses_a_socket_output_before_any_work(
    tiny_build, tiny_checkpoint_dir, tmp_path, name, command, error_line
):
    result, _ = tiny_build
    build = tmp_path / "b"
    shutil.copytree(result.out_dir, build)
    before = sha256_tree(build)
    out = tmp_path / "x" / name
    out.parent.mkdir()
    with _socket_at(out):
        run = invoke(*command(tiny_checkpoint_dir, build, out))
        assert "is a socket" in error_line(run, 2)
        assert stat.S_ISSOCK(os.stat(out).st_mode)
    assert sha256_tree(build) == before  # nothing written, nothing started
    assert os.listdir(out.parent) == [name]


def test_a_full_disk_writing_a_manifest(tiny_build, tmp_path, monkeypatch, error_line):
    result, _ = tiny_build
    build = tmp_path / "b"
    shutil.copytree(result.out_dir, build)
    manifest = build / "manifest.json"
    before = manifest.read_bytes()
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    shards = sorted(build.glob("*.mlpackage"))
    run = invoke(
        "manifest", "build", *shards, "--embedding", build / "embedding.npy", "-o", manifest,
        "--overwrite",
    )  # fmt: skip
    assert f"no space left on device writing {manifest}: needs " in error_line(run, 1)
    assert manifest.read_bytes() == before and partials(build) == []


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_artifacts_get_the_permissions_of_the_umask(
    tiny_checkpoint_dir, tmp_path, umask, file_mode, dir_mode
):
    """coremltools and safetensors stage through private temporary files (0600, 0700); what
    anechain writes must be as readable as any file the user creates, and no more."""
    old = os.umask(umask)
    try:
        ckpt = tmp_path / "ckpt"
        assert invoke("random-checkpoint", ckpt, "--preset", "tiny").exit_code == 0
        pkg = tmp_path / "s.mlpackage"
        result = invoke("export", "--model", ckpt, "--config", TINY, "--layer-spec", f"0:1:{pkg}")
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    for item in [*ckpt.iterdir(), pkg, *pkg.rglob("*")]:
        mode = stat.S_IMODE(item.stat().st_mode)
        assert mode == (dir_mode if item.is_dir() else file_mode), (item, oct(mode))
