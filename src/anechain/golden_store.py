"""The golden reference on disk: one .npy file per layer, read back memory-mapped.

A full-size reference is large (Phi-4-mini, 2048 positions: 25 MB of hidden state and 17 MB
of KV cache per layer, 1.4 GB for 32 layers), and a validation reads only a few layers of it
at a time: the shard's boundaries, one layer's KV while the rest of the model is finished
for the next-token verdict. So every layer is its own file, written atomically the moment it
is computed, and `Stack` hands out memory maps: what is not read is never in memory.

Files, in one folder per (checkpoint, calibration tokens):
    h000.npy ...  (S, C) float32: the hidden state entering layer i (h000: the embedding)
    k000.npy ...  (KVH, S, D) float32: layer i's key cache, post-RoPE (transformers')
    v000.npy ...  (KVH, S, D) float32: layer i's value cache
A truncated, corrupt or foreign file is a miss (that layer and the ones after it are
recomputed and rewritten), never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from anechain.fsutil import atomic_path

log = logging.getLogger(__name__)


class Stack:
    """A read-only, lazy stack of same-shaped float32 arrays, one memory-mapped file each.

    Indexed like the (N, *shape) array it stands for: `stack[i]` is entry i (a memory map),
    `stack[a:b]` another Stack, `stack[i, ...]` and `np.asarray(stack)` read what they need.
    """

    def __init__(self, files: list[Path], shape: tuple[int, ...]) -> None:
        self._files = list(files)
        self._item_shape = tuple(shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._files), *self._item_shape)

    @property
    def dtype(self) -> np.dtype[np.float32]:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: object) -> np.ndarray | Stack:
        if isinstance(index, slice):
            return Stack(self._files[index], self._item_shape)
        if isinstance(index, tuple) and index:
            first, rest = index[0], index[1:]
            picked = self[first]
            if isinstance(picked, Stack):
                return np.asarray(picked)[(slice(None), *rest)]
            return picked[rest]
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} is out of range for {len(self)} layers")
            return np.load(self._files[i], mmap_mode="r")
        return np.asarray(self)[index]  # type: ignore[index]

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        for i in range(len(self)):
            out[i] = self[i]
        return out if dtype is None else out.astype(dtype)


def _valid(path: Path, shape: tuple[int, ...]) -> bool:
    """The file holds a float32 array of `shape` (header checked, data length too)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return arr.dtype == np.float32 and arr.shape == shape


class LayerStore:
    """One reference's folder: which layers are there, and writing a new one."""

    def __init__(self, folder: Path, hidden: tuple[int, int], kv: tuple[int, int, int]) -> None:
        self.folder = folder
        self.hidden_shape = hidden  # (S, C)
        self.kv_shape = kv  # (KVH, S, D)

    def _h(self, i: int) -> Path:
        return self.folder / f"h{i:03d}.npy"

    def _kv(self, kind: str, i: int) -> Path:
        return self.folder / f"{kind}{i:03d}.npy"

    def layers_done(self, upto: int) -> int:
        """How many layers (0, 1, ...) are complete on disk, at most `upto`; -1 if not even
        the embedding (h000) is."""
        if not _valid(self._h(0), self.hidden_shape):
            return -1
        done = 0
        while done < upto and (
            _valid(self._h(done + 1), self.hidden_shape)
            and _valid(self._kv("k", done), self.kv_shape)
            and _valid(self._kv("v", done), self.kv_shape)
        ):
            done += 1
        if done < upto and self._h(done + 1).exists():
            log.warning("recomputing the golden reference from layer %d in %s", done, self.folder)
        return done

    def write_embedding(self, hidden: np.ndarray) -> None:
        self._write(self._h(0), hidden, self.hidden_shape)

    def write_layer(self, i: int, hidden: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Layer i's output and KV; the output last, since it marks the layer complete."""
        self._write(self._kv("k", i), keys, self.kv_shape)
        self._write(self._kv("v", i), values, self.kv_shape)
        self._write(self._h(i + 1), hidden, self.hidden_shape)

    def _write(self, path: Path, value: np.ndarray, shape: tuple[int, ...]) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{path.name}: shape {value.shape}, expected {shape}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True, expected_bytes=value.nbytes + 128) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, value, allow_pickle=False)

    def boundaries(self, upto: int) -> Stack:
        return Stack([self._h(i) for i in range(upto + 1)], self.hidden_shape)

    def keys(self, upto: int) -> Stack:
        return Stack([self._kv("k", i) for i in range(upto)], self.kv_shape)

    def values(self, upto: int) -> Stack:
        return Stack([self._kv("v", i) for i in range(upto)], self.kv_shape)
