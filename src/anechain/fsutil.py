"""Outputs: atomic writes, what an output path may be, and recovery from interrupted runs.

Every artifact is written into a hidden work folder beside its destination,
`.NAME.<token>.partial`, and moved into place only when complete, so it either exists
whole at its path or not at all. The work folder is locked (flock) while its process
lives: a folder nobody holds is what a killed run left, and the next write to that
destination recovers or removes it before anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import inspect
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from anechain.errors import DiskFullError, OutputPathError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"
F = TypeVar("F", bound=Callable[..., Any])


# --- what an output may be ---------------------------------------------------------------


# Streams: what is there is written to, never replaced (a terminal, /dev/null, a pipe).
_STREAM_ROOTS = ("/dev/", "/proc/")


def writes_in_place(dest: str | Path, folder: bool = False) -> bool:
    """Decide what writing to `dest` means; the one place every output goes through.

    Missing, a regular file or a folder: written atomically (replaced), so False. A
    character device or a FIFO (/dev/null, a terminal, /dev/stdout piped), or anything
    that exists under /dev or /proc (/dev/stdout redirected to a file): written to in
    place, never replaced, so True. A socket or a block device is refused, and so is a
    stream where a folder (`folder`) would have to go, and so is a path that is not UTF-8
    (bytes the terminal could not decode: coremltools takes paths as str).
    """
    try:
        str(dest).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputPathError(f"{dest!r} is not a UTF-8 path; name outputs in UTF-8") from None
    try:
        mode = os.stat(dest).st_mode  # follows symlinks: /dev/stdout -> /proc/self/fd/1
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputPathError(f"cannot use {dest} as an output: {exc.strerror}") from None
    special = str(Path(dest).absolute()).startswith(_STREAM_ROOTS)
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or (special and stat.S_ISREG(mode)):
        if folder:
            raise OutputPathError(f"{dest} is a stream, not a place a folder can be written")
        return True
    if stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and not special):
        return False
    kind = (
        "a socket"
        if stat.S_ISSOCK(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a special folder"
        if stat.S_ISDIR(mode)
        else "a special file"
    )
    raise OutputPathError(f"{dest} is {kind}; outputs must be regular files, folders or streams")


# --- work folders, locks, recovery ---------------------------------------------------------


# flock's answer when another process holds the lock; any other errno means the
# filesystem cannot lock (some network and FUSE mounts): ENOLCK, EOPNOTSUPP, ... Treating
# those as "held" would make every new work folder look taken, forever.
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN)


class _NoLocks(Exception):
    """This filesystem has no flock."""


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on folder `path`, or None if someone holds it (or
    it is gone). _NoLocks where the filesystem cannot lock at all."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _HELD:
            return None
        raise _NoLocks(exc.strerror) from None
    return fd


# `.NAME.<12 hex>.partial` (ours) or `.NAME.<8 chars>.partial` (tempfile.mkdtemp, as
# anechain named them before the work folders were locked).
_PARTIAL_NAME = re.compile(
    r"\.(?P<name>.+)\.(?:[0-9a-f]{12}|[a-z0-9_]{8})" + re.escape(PARTIAL_SUFFIX)
)


def recover(dest: str | Path) -> None:
    """Sweep what killed runs left in dest's folder, restoring packages stranded mid-swap.

    A work folder that no live process holds (its flock is free) is stale. If it holds
    `NAME.old` and NAME is gone, its run died between moving the old copy aside and moving
    the new one in: the old copy goes back to its path. Everything else in it is deleted.
    Every output's folder is swept before the output is written, so nothing stays.
    """
    folder = Path(dest).parent
    if not folder.is_dir():
        return
    for partial in sorted(folder.glob(f".*{PARTIAL_SUFFIX}")):
        match = _PARTIAL_NAME.fullmatch(partial.name)
        if match is None or not partial.is_dir() or partial.is_symlink():
            continue
        try:
            fd = _try_lock(partial)
        except _NoLocks:
            return  # nothing can tell a live run's folder from a stale one: leave them all
        if fd is None:
            continue  # a live run's work folder
        try:
            name = match["name"]
            old, target = partial / (name + _OLD_SUFFIX), folder / name
            if (old.exists() or old.is_symlink()) and not (target.exists() or target.is_symlink()):
                os.replace(old, target)
                log.warning("restored %s from an interrupted overwrite", target)
            shutil.rmtree(partial, ignore_errors=True)
            log.info("removed %s, left by an interrupted run", partial)
        finally:
            os.close(fd)


def _same_folder(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:  # swept and not recreated
        return False


@contextlib.contextmanager
def work_folder(dest: str | Path, parent: Path | None = None) -> Iterator[Path]:
    """A locked hidden folder beside `dest` (or in `parent`) for one write, removed on
    every exit we see.

    Its name is chosen before it exists, so an interrupt that lands while it is being
    created still finds it in `finally`; a SIGKILL leaves it unlocked for `recover`.
    """
    dest = Path(dest)
    where = parent if parent is not None else dest.parent
    fd: int | None = None
    path: Path | None = None
    try:
        while fd is None:
            path = where / f".{dest.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
            os.mkdir(path, 0o700)
            try:
                fd = _try_lock(path)
            except _NoLocks:
                # Unlocked: its fresh random name is all that keeps it ours, and `recover`
                # on this filesystem leaves work folders alone.
                fd = os.open(path, os.O_RDONLY)
            # A sweep by another run may have taken it between mkdir and the lock.
            if fd is not None and not _same_folder(fd, path):
                os.close(fd)
                fd = None
        yield path
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _parents_of(dest: Path) -> Iterator[None]:
    """Create dest's missing folders, and remove those still empty at the end: a failed
    write leaves no trace at its destination."""
    missing = [p for p in dest.parents if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: it holds the output (or someone else's files)


@contextlib.contextmanager
def scratch_tempdir(dest: str | Path) -> Iterator[Path]:
    """Point `tempfile` at a work folder beside `dest` for the duration of the block.

    coremltools writes its intermediate .mlpackage and weights with `tempfile` during
    convert and save and removes them only at interpreter exit; a killed export would
    leave them in TMPDIR forever. Here they live in the locked work folder, removed on
    exit or swept by the next run.
    """
    dest = Path(dest)
    writes_in_place(dest, folder=True)
    recover(dest)
    saved = tempfile.tempdir
    with _parents_of(dest), work_folder(dest) as work:
        tempfile.tempdir = str(work)
        try:
            yield work
        finally:
            tempfile.tempdir = saved


def isolated_tempdir(dest_arg: str) -> Callable[[F], F]:
    """Decorator: run the function inside `scratch_tempdir` of its argument `dest_arg`
    (a path, or an object with a `.path`)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = signature.bind(*args, **kwargs).arguments[dest_arg]
            with scratch_tempdir(Path(getattr(value, "path", value))):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


# --- the atomic swap -----------------------------------------------------------------------


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step where the OS can; False where it cannot."""
    libc = _libc()
    if libc is None:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 0x2
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this filesystem cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, dest: Path, work: Path) -> None:
    """Put finished `tmp` at `dest`, replacing what is there without ever losing both."""
    exists = dest.exists() or dest.is_symlink()
    if not exists or (tmp.is_file() and not dest.is_dir()):
        os.replace(tmp, dest)  # a file replaces a file atomically
        return
    if _exchange(tmp, dest):
        return  # the old copy is now at tmp, inside the work folder, and goes with it
    # No swap on this filesystem: move the old one aside (inside the work folder, where
    # `recover` finds it if we are killed now), then the new one in.
    old = work / (dest.name + _OLD_SUFFIX)
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise


# --- atomic writes -------------------------------------------------------------------------


def shutil_error_entries(exc: BaseException) -> list[tuple[str, str, str]]:
    """The (src, dst, why) list shutil.copytree raises as one shutil.Error, else []."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        return [tuple(map(str, e)) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3]
    return []


def _disk_full_cause(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the disk is full (a converter may wrap it)."""
    if isinstance(exc, DiskFullError):
        return None  # already says which file (a write nested in this one)
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        entries = shutil_error_entries(seen)
        if entries and any(os.strerror(errno.ENOSPC) in why for _, _, why in entries):
            return seen
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        if os.strerror(errno.ENOSPC) in str(seen):  # C++ writers report it as text
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _copy_source_size(exc: shutil.Error, tmp: Path) -> int | None:
    """How big the folder shutil.copytree was copying into `tmp` is (from its error list)."""
    for src_text, dst_text, _why in shutil_error_entries(exc):
        src, dst = Path(src_text), Path(dst_text)
        try:
            rel = dst.relative_to(tmp)
        except ValueError:
            continue
        root = src
        for _ in rel.parts:
            root = root.parent
        return _tree_size(root) if root.is_dir() else None
    return None


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def disk_full_error(
    dest: Path, exc: BaseException, tmp: Path | None, need: int | None
) -> DiskFullError:
    """One line: which file could not be written, how much it needed, how much was free."""
    where, written = dest, None
    if isinstance(exc, shutil.Error):
        if need is None and tmp is not None:
            need = _copy_source_size(exc, tmp)
    elif isinstance(exc, OSError) and exc.filename and tmp is None:
        where = Path(exc.filename)
    if need is None and tmp is not None and (tmp.exists() or tmp.is_symlink()):
        written = _tree_size(tmp)
    try:
        free = shutil.disk_usage(dest.parent if dest.parent.exists() else ".").free
        free_text = f"{human_size(free)} free"
    except OSError:
        free_text = "free space unknown"
    need_text = (
        f"needs {human_size(need)}, "
        if need is not None
        else f"needs more than the {human_size(written)} written when it filled, "
        if written is not None
        else ""
    )
    return DiskFullError(
        f"no space left on device writing {where}: {need_text}{free_text} on its filesystem"
    )


def _free(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def filled_by(
    exc: BaseException,
    dest: Path,
    need: int | None,
    work: Path | None = None,
    at_least: bool = False,
) -> DiskFullError | None:
    """The DiskFullError an error of a writer that does not say ENOSPC means, if a disk it
    wrote to is full; else None.

    coremltools' MIL FileWriter reports a full disk as "Unknown error occurred while
    writing data to the file", and its temporary files go to `tempfile.gettempdir()`
    (TMPDIR, or the work folder beside dest while an export runs). So: a filesystem the
    write used with less free space than the `need`ed bytes is the one that filled, and
    is named; TMPDIR's when it is not dest's own. Call it while the writer's partial
    files still exist. `at_least`: `need` is a lower bound.
    """
    if isinstance(exc, DiskFullError):
        return exc
    scratch = Path(tempfile.gettempdir())
    places = [(dest, work or dest.parent)]
    if _same_fs(scratch, dest.parent) is False:
        places.append((scratch, scratch))
    frees = [(where, free) for where, folder in places if (free := _free(folder)) is not None]
    if _disk_full_cause(exc) is not None:  # ENOSPC said: the fuller filesystem filled
        full = sorted(frees, key=lambda f: f[1])[:1]
    else:
        full = [(w, f) for w, f in frees if need is not None and f < need][:1]
    if not full:
        return None
    where, free = full[0]
    what = (
        str(dest)
        if where == dest
        else f"coremltools' temporary files in {scratch} (TMPDIR) for {dest}"
    )
    how = "at least" if at_least else "about"
    need_text = f"needs {how} {human_size(need)}, " if need is not None else ""
    return DiskFullError(
        f"no space left on device writing {what}: {need_text}{human_size(free)} free "
        f"on its filesystem"
    )


def _same_fs(a: Path, b: Path) -> bool | None:
    try:
        return _existing(a).stat().st_dev == _existing(b).stat().st_dev
    except OSError:
        return None


def _existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return path


@contextlib.contextmanager
def atomic_path(
    dest: str | Path, overwrite: bool = False, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; move it onto `dest` only if the block succeeds.

    Works for files and folders (.mlpackage, .mlmodelc). The temporary lives in dest's
    folder so the final move is atomic on one filesystem; a folder replaces a folder by
    an atomic swap where the OS has one. A stream at `dest` (/dev/null, /dev/stdout, a
    FIFO; see `writes_in_place`) is written to in place, never replaced. A full disk is
    one DiskFullError naming `dest` (`expected_bytes`, if known, is the space needed).
    """
    dest = Path(dest)
    device = writes_in_place(dest)
    if not device:
        recover(dest)
    # A stream's folder (/dev) is no place for ours: its copy goes through TMPDIR.
    with (
        contextlib.nullcontext() if device else _parents_of(dest),
        work_folder(dest, Path(tempfile.gettempdir()) if device else None) as work,
    ):
        tmp = work / dest.name
        try:
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written for {dest}")
            if device:
                if not tmp.is_file():
                    raise OutputPathError(f"{dest} is a stream; a folder cannot be written to it")
                # Append: /dev/stdout may be a file the shell opened with >>.
                with open(tmp, "rb") as src, open(dest, "ab") as out:
                    shutil.copyfileobj(src, out)
                return
            exists = dest.exists() or dest.is_symlink()
            if exists and not overwrite:
                raise FileExistsError(f"{dest} already exists")
            widen_to_umask(tmp)
            _move_into_place(tmp, dest, work)
        except Exception as exc:  # measured here, while what was written is still there
            cause = _disk_full_cause(exc)
            if cause is not None:
                raise disk_full_error(dest, cause, tmp, expected_bytes) from None
            raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def widen_to_umask(path: Path) -> None:
    """Give what we wrote the permissions a plain open() or mkdir() would have: writers that
    stage through temporary files (coremltools' model.mlmodel and weights folder, safetensors)
    leave 0600 / 0700, which hides a shared artifact folder from everyone else."""
    allowed = ~_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if item.is_symlink():
            continue
        mode = item.stat().st_mode
        want = mode | ((0o777 if stat.S_ISDIR(mode) else 0o666) & allowed)
        if stat.S_IMODE(want) != stat.S_IMODE(mode):
            item.chmod(stat.S_IMODE(want))


def atomic_write_text(dest: str | Path, text: str, overwrite: bool = True) -> None:
    data = text.encode()
    with atomic_path(dest, overwrite=overwrite, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


# --- digests -------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Digest of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()
