"""Atomic writes: an artifact either exists complete at its path or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds.

    Works for files and folders (.mlpackage, .mlmodelc). The temporary lives in dest's
    folder so the final rename is atomic on one filesystem.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    tmp = tmp_dir / dest.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for {dest}")
        exists = dest.exists() or dest.is_symlink()
        if exists and not overwrite:
            raise FileExistsError(f"{dest} already exists")
        if not exists or (tmp.is_file() and not dest.is_dir()):
            os.replace(tmp, dest)  # a file replaces a file atomically
        else:
            # A folder cannot be renamed over a folder: move the old one aside, and back if
            # the new one cannot take its place, so nothing is lost.
            old = tmp_dir / (dest.name + ".old")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old, dest)
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(dest: str | Path, text: str, overwrite: bool = True) -> None:
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.write_text(text)


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
