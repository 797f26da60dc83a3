"""Random instances of every MIL op the `mil` runner implements, for tests/test_mil_ops.py.

`CASES[op](rng)` draws a list of `Case`s over shapes, dtypes and attributes (masks,
negative indices and axes, keep_dims, interleave, transpose flags, epsilons, strides, pad
types, INT8 weights). Only attribute sets coremltools accepts, with rank <= 5 and no rank-0
outputs (as Core ML), are drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tests.mil_references import (
    Case,
    Constexpr,
    conv_weight_reference,
    interleave_reference,
    silu_reference,
)

Rng = np.random.Generator
FLOATS = (np.float16, np.float32)
NUMBERS = (np.float16, np.float32, np.int32)


def _shape(rng: Rng, rank: int, hi: int = 5) -> tuple[int, ...]:
    return tuple(int(d) for d in rng.integers(1, hi + 1, rank))


def _values(rng: Rng, shape: tuple[int, ...], dtype: Any, lo: int = -(2**29)) -> np.ndarray:
    """Floats over several magnitudes; int32s large enough that float32 would round them."""
    if np.dtype(dtype).kind == "i":
        return rng.integers(lo, -lo, shape).astype(np.int32)
    scale = 10.0 ** rng.uniform(-2, 2)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _pick(rng: Rng, options: tuple[Any, ...]) -> Any:
    return options[int(rng.integers(len(options)))]


def _axis(rng: Rng, rank: int) -> int:
    a = int(rng.integers(rank))
    return a - rank if rng.random() < 0.5 else a


# --- elementwise ---------------------------------------------------------------------------


def _broadcast_pair(rng: Rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = _shape(rng, int(rng.integers(1, 5)))
    shapes = []
    for _ in range(2):
        s = tuple(d if rng.random() < 0.6 else 1 for d in out)
        shapes.append(s[int(rng.integers(len(s))) :] if rng.random() < 0.3 else s)
    return shapes[0], shapes[1]


def _binary(op: str, dtypes: tuple[Any, ...], n: int = 24) -> Callable[[Rng], list[Case]]:
    def cases(rng: Rng) -> list[Case]:
        out = []
        for i in range(n):
            dtype = dtypes[i % len(dtypes)]
            xs, ys = _broadcast_pair(rng)
            lo = -(2**14) if op == "mul" else -(2**29)
            x, y = _values(rng, xs, dtype, lo), _values(rng, ys, dtype, lo)
            if op == "real_div":  # away from 0
                y = (np.sign(y) * (np.abs(y) + 0.5)).astype(dtype)
            if rng.random() < 0.3:
                out.append(Case(op, {"x": x}, {"y": y}))
            else:
                out.append(Case(op, {"x": x, "y": y}))
        return out

    return cases


def _unary(op: str, dtypes: tuple[Any, ...], positive: bool = False) -> Callable[[Rng], list[Case]]:
    def cases(rng: Rng) -> list[Case]:
        out = []
        for i in range(12):
            x = _values(rng, _shape(rng, int(rng.integers(1, 4))), dtypes[i % len(dtypes)])
            out.append(Case(op, {"x": np.abs(x) if positive else x}))
        return out

    return cases


def _epsilon_op(op: str) -> Callable[[Rng], list[Case]]:
    """inverse / rsqrt: x near 0, so the epsilon (default or drawn, fp16 or fp32) matters."""

    def cases(rng: Rng) -> list[Case]:
        out = []
        for i in range(16):
            dtype = FLOATS[i % 2]
            x = (10.0 ** rng.uniform(-3, 1, _shape(rng, int(rng.integers(1, 4))))).astype(dtype)
            if op == "inverse":
                x = (x * rng.choice([-1, 1], x.shape)).astype(dtype)
            attrs = {}
            if i % 4:
                eps = 10.0 ** rng.uniform(-4, -1)
                attrs["epsilon"] = _pick(rng, FLOATS)(eps)
                if op == "inverse":  # keep x + epsilon away from 0
                    x = np.where(np.abs(x) < 2 * eps, np.float32(3 * eps), x).astype(dtype)
            out.append(Case(op, {"x": x}, attrs))
        return out

    return cases


def _silu(rng: Rng) -> list[Case]:
    out = []
    for i in range(12):
        x = rng.standard_normal(_shape(rng, 3)) * 4
        x.flat[: x.size // 3] = rng.uniform(-30, -8, x.size // 3)  # sigmoid's tail
        x = x.astype(FLOATS[i % 2])
        out.append(Case("silu", {"x": x}, reference=silu_reference, ulps=1, terms=8, relative=True))
    return out


def _clip(rng: Rng) -> list[Case]:
    out = []
    for i in range(12):
        dtype = FLOATS[i % 2]
        x = _values(rng, _shape(rng, 3), dtype)
        alpha, beta = np.sort(rng.standard_normal(2) * np.abs(x).max())
        beta = np.inf if i % 4 == 0 else beta + 1e-2  # max(x, alpha), as RMSNorm's scale
        out.append(Case("clip", {"x": x}, {"alpha": dtype(alpha), "beta": dtype(beta)}))
    return out


def _cast(rng: Rng) -> list[Case]:
    pairs = [
        ("float16", "fp32"),
        ("float32", "fp16"),
        ("float16", "int32"),
        ("float32", "int32"),
        ("int32", "fp16"),
        ("int32", "fp32"),
    ]
    out = []
    for i in range(18):
        src, dst = pairs[i % len(pairs)]
        shape = _shape(rng, 3)
        if src == "int32":
            x = rng.integers(-70000, 70000, shape).astype(np.int32)  # beyond fp16's range too
        else:  # fractions of both signs (truncation), and beyond fp16's range for fp32
            x = (rng.standard_normal(shape) * _pick(rng, (3.0, 300.0, 3e4))).astype(src)
        out.append(Case("cast", {"x": x}, {"dtype": dst}))
    return out


# --- reductions, softmax, matmul, conv -----------------------------------------------------


def _reduce(op: str) -> Callable[[Rng], list[Case]]:
    def cases(rng: Rng) -> list[Case]:
        out = []
        for i in range(20):
            rank = int(rng.integers(1, 5))
            x = _values(rng, _shape(rng, rank, 6), NUMBERS[i % 3], lo=-(2**20))
            attrs: dict[str, Any] = {}
            axes = None
            if rng.random() < 0.8:
                k = int(rng.integers(1, rank + 1))
                axes = sorted(rng.choice(rank, k, replace=False).tolist())
                axes = [a - rank if rng.random() < 0.5 else a for a in axes]
                attrs["axes"] = np.array(axes, np.int32)
            if rng.random() < 0.7:
                attrs["keep_dims"] = bool(rng.random() < 0.5)
            n = int(np.prod([x.shape[a] for a in axes])) if axes is not None else x.size
            if (attrs.get("keep_dims") is not True) and (axes is None or len(axes) == rank):
                attrs["keep_dims"] = True  # no rank-0 program outputs
            exact = op == "reduce_max"
            out.append(Case(op, {"x": x}, attrs, ulps=0 if exact else 1, terms=0 if exact else n))
        return out

    return cases


def _reduce_argmax(rng: Rng) -> list[Case]:
    out = []
    for i in range(16):
        rank = int(rng.integers(2, 5))
        x = _values(rng, _shape(rng, rank, 6), NUMBERS[i % 3])
        attrs: dict[str, Any] = {"axis": _axis(rng, rank)}
        if rng.random() < 0.7:
            attrs["keep_dims"] = bool(rng.random() < 0.5)
        out.append(Case("reduce_argmax", {"x": x}, attrs))
    return out


def _softmax(rng: Rng) -> list[Case]:
    out = []
    for i in range(16):
        rank = int(rng.integers(1, 5))
        x = (rng.standard_normal(_shape(rng, rank, 6)) * _pick(rng, (0.1, 3.0, 30.0))).astype(
            FLOATS[i % 2]
        )
        attrs = {"axis": _axis(rng, rank)} if rng.random() < 0.8 else {}
        n = x.shape[attrs.get("axis", -1)]
        # fp32 exp and sum: a relative error of a few ulps per term (scale: the output).
        out.append(Case("softmax", {"x": x}, attrs, ulps=1, terms=4 * n, relative=True))
    # Attention-sized (the runner computes these in torch): masked logits at -30000.
    for i in range(2):
        x = rng.standard_normal((2, 3, 16, 256)) * 8.0
        x[..., 200:] -= 30000.0
        n = x.shape[-1 - i]
        out.append(
            Case("softmax", {"x": x.astype(FLOATS[i])}, {"axis": -1 - i}, ulps=1, terms=4 * n,
                 relative=True)
        )  # fmt: skip
    return out


def _matmul(rng: Rng) -> list[Case]:
    out = []
    for i in range(24):
        dtype = NUMBERS[i % 3]
        m, n, k = (int(d) for d in rng.integers(1, 7, 3))
        k *= 3
        if i % 3 == 0:  # square operands: a transpose flag then changes values, not shape
            m = n = k
        batch = _shape(rng, 2, 3)
        # coremltools' type inference refuses a rank-1 y and declares the wrong shape for a
        # rank-1 x with a y of rank > 2 (it removes a batch dimension): not drawn.
        ranks = [int(rng.integers(1, 5)), int(rng.integers(2, 5))]
        if ranks[0] == 1:
            ranks[1] = 2
        tx = ranks[0] > 1 and bool(rng.random() < 0.5)
        ty = ranks[1] > 1 and bool(rng.random() < 0.5)
        if m == n == k:  # one flag each time, alternating
            tx, ty = ranks[0] > 1 and i % 2 == 0, i % 2 == 1
        shapes = []
        for rank, last in (
            (ranks[0], (k, m) if tx else (m, k)),
            (ranks[1], (n, k) if ty else (k, n)),
        ):
            if rank == 1:
                shapes.append((k,))
                continue
            lead = tuple(d if rng.random() < 0.7 else 1 for d in batch[2 - (rank - 2) :])
            shapes.append((*lead, *last))
        x, y = _values(rng, shapes[0], dtype, lo=-100), _values(rng, shapes[1], dtype, lo=-100)
        attrs: dict[str, Any] = {}
        if tx or rng.random() < 0.3:
            attrs["transpose_x"] = tx
        if ty or rng.random() < 0.3:
            attrs["transpose_y"] = ty
        inputs: dict[str, Any] = {"x": x}
        if rng.random() < 0.3:
            attrs["y"] = y
        else:
            inputs["y"] = y
        out.append(Case("matmul", inputs, attrs, ulps=1, terms=k))
    # Grouped-query attention: G query heads per key head, the keys broadcast over the group
    # (the runner folds the group into the rows).
    for i, (lead, g, m, k, n) in enumerate(((2, 3, 5, 8, 7), (1, 4, 1, 16, 9), (3, 2, 4, 6, 6))):
        dtype = FLOATS[i % 2]
        x = _values(rng, (lead, g, m, k), dtype, lo=-100)
        if i < 2:  # scores: q @ k^T
            y, attrs = _values(rng, (lead, 1, n, k), dtype, lo=-100), {"transpose_y": True}
        else:  # context: probabilities @ v
            y, attrs = _values(rng, (lead, 1, k, n), dtype, lo=-100), {}
        out.append(Case("matmul", {"x": x, "y": y}, attrs, ulps=1, terms=k))
    return out


def _conv(rng: Rng) -> list[Case]:
    """1x1 convs (what the runner computes) in every form coremltools accepts for them."""
    out = []
    for i in range(20):
        spatial = int(rng.integers(1, 4))
        c_in, c_out = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        x = _values(rng, (int(rng.integers(1, 3)), c_in, *_shape(rng, spatial)), FLOATS[i % 2])
        w = (rng.standard_normal((c_out, c_in, *[1] * spatial)) * 0.5).astype(np.float16)
        attrs: dict[str, Any] = {}
        inputs: dict[str, Any] = {"x": x}
        form = i % 3
        if form == 0:
            attrs["weight"] = w
        elif form == 1:  # INT8 per-channel (or blockwise over input channels), with offsets
            blocks = _pick(rng, tuple(b for b in (1, 2, 4) if c_in % b == 0))
            data = rng.integers(-127, 128, w.shape).astype(np.int8)
            scale = (rng.uniform(0.001, 0.02, (c_out, c_in // blocks, *[1] * spatial))).astype(
                np.float16
            )
            offset = rng.integers(-3, 4, scale.shape).astype(np.int8) if i % 2 else None
            attrs["weight"] = Constexpr(data, scale, offset)
        else:  # weight computed at run time
            inputs["weight"] = w.astype(x.dtype)
        if rng.random() < 0.5:
            attrs["bias"] = rng.standard_normal(c_out).astype(np.float16 if form != 2 else x.dtype)
        if rng.random() < 0.6:
            attrs["strides"] = rng.integers(1, 4, spatial).astype(np.int32)
        pad_type = _pick(rng, ("valid", "same", "same_lower", "custom"))
        if pad_type != "valid" or rng.random() < 0.5:
            attrs["pad_type"] = pad_type
        if pad_type == "custom":
            attrs["pad"] = np.zeros(2 * spatial, np.int32)
        if form != 2 and rng.random() < 0.4:  # no effect on a 1x1 kernel
            attrs["dilations"] = rng.integers(1, 4, spatial).astype(np.int32)
        if rng.random() < 0.3:
            attrs["groups"] = np.int32(1)
        out.append(Case("conv", inputs, attrs, conv_weight_reference, ulps=1, terms=c_in + 1))
    return out


# --- shape and indexing --------------------------------------------------------------------


def _reshape(rng: Rng) -> list[Case]:
    out = []
    for i in range(20):
        x = _values(rng, _shape(rng, int(rng.integers(1, 5)), 4), NUMBERS[i % 3])
        rank = int(rng.integers(1, 6))
        # A random shape of the same size, then 0s where the iOS17 rule gives that dimension
        # (aligned from the right, 1 beyond the input's rank) and maybe one -1.
        shape = [1] * rank
        for p in range(x.ndim):
            for f in _factors(x.shape[p]):
                shape[int(rng.integers(rank))] *= f
        lead = rank - x.ndim
        for j in range(rank):
            same = x.shape[j - lead] if j >= lead else 1
            if shape[j] == same and rng.random() < 0.5:
                shape[j] = 0
        if rng.random() < 0.5:
            shape[int(rng.integers(rank))] = -1
        out.append(Case("reshape", {"x": x}, {"shape": np.array(shape, np.int32)}))
    return out


def _factors(n: int) -> list[int]:
    f, p = [], 2
    while n > 1:
        while n % p == 0:
            f.append(p)
            n //= p
        p += 1
    return f


def _expand_dims(rng: Rng) -> list[Case]:
    out = []
    for i in range(16):
        x = _values(rng, _shape(rng, int(rng.integers(1, 4))), NUMBERS[i % 3])
        k = int(rng.integers(1, 6 - x.ndim))  # Core ML: rank <= 5
        rank = x.ndim + k
        axes = rng.choice(rank, k, replace=False)
        axes = [int(a) - rank if rng.random() < 0.5 else int(a) for a in axes]
        out.append(Case("expand_dims", {"x": x}, {"axes": np.array(axes, np.int32)}))
    return out


def _squeeze(rng: Rng) -> list[Case]:
    out = []
    for i in range(12):
        shape = tuple(1 if rng.random() < 0.5 else int(rng.integers(2, 5)) for _ in range(4))
        x = _values(rng, shape, NUMBERS[i % 3])
        ones = [a for a, d in enumerate(shape) if d == 1]
        attrs = {}
        if (ones and rng.random() < 0.7) or len(ones) == 4:
            k = int(rng.integers(1, len(ones) + 1)) if len(ones) < 4 else 3
            axes = sorted(rng.choice(ones, k, replace=False).tolist())
            attrs["axes"] = np.array([a - 4 if rng.random() < 0.5 else a for a in axes], np.int32)
        out.append(Case("squeeze", {"x": x}, attrs))
    return out


def _transpose(rng: Rng) -> list[Case]:
    out = []
    for i in range(12):
        x = _values(rng, _shape(rng, int(rng.integers(2, 5))), NUMBERS[i % 3])
        perm = rng.permutation(x.ndim).astype(np.int32)
        out.append(Case("transpose", {"x": x}, {"perm": perm}))
    return out


def _split(rng: Rng) -> list[Case]:
    out = []
    for i in range(12):
        rank = int(rng.integers(1, 4))
        axis = _axis(rng, rank)
        parts = int(rng.integers(2, 4))
        shape = list(_shape(rng, rank))
        if i % 2:
            sizes = rng.integers(1, 4, parts)
            shape[axis] = int(sizes.sum())
            attrs: dict[str, Any] = {"split_sizes": sizes.astype(np.int32), "axis": axis}
        else:
            shape[axis] *= parts
            attrs = {"num_splits": parts, "axis": axis}
        out.append(Case("split", {"x": _values(rng, tuple(shape), NUMBERS[i % 3])}, attrs))
    return out


def _concat(rng: Rng) -> list[Case]:
    out = []
    for i in range(20):
        dtype = NUMBERS[i % 3]
        rank = int(rng.integers(1, 5))
        axis = _axis(rng, rank)
        base = list(_shape(rng, rank))
        interleave = i % 2 == 1
        values = []
        for _ in range(int(rng.integers(1, 5)) + int(interleave)):
            s = list(base)
            if not interleave:
                s[axis] = int(rng.integers(1, 4))
            values.append(_values(rng, tuple(s), dtype))
        attrs: dict[str, Any] = {"axis": axis}
        if interleave or rng.random() < 0.3:
            attrs["interleave"] = interleave
        ref = interleave_reference if interleave else None
        out.append(Case("concat", {"values": values}, attrs, ref))
    return out


def _slice_attrs(rng: Rng, shape: tuple[int, ...]) -> dict[str, Any]:
    rank = len(shape)
    begin, end, stride = [], [], []
    masks: dict[str, list[bool]] = {"begin_mask": [], "end_mask": [], "squeeze_mask": []}
    for d in shape:
        begin.append(int(rng.integers(-d, d)))
        end.append(int(rng.integers(-d, d + 2)))
        stride.append(int(_pick(rng, (1, 1, 2, 3, -1, -2))))
        for key, p in (("begin_mask", 0.3), ("end_mask", 0.3), ("squeeze_mask", 0.2)):
            masks[key].append(bool(rng.random() < p))
    attrs: dict[str, Any] = {"begin": np.array(begin, np.int32), "end": np.array(end, np.int32)}
    if rng.random() < 0.7:
        attrs["stride"] = np.array(stride, np.int32)
    for key, m in masks.items():
        if any(m) or rng.random() < 0.2:
            attrs[key] = np.array(m)
    if attrs.get("squeeze_mask") is not None and all(attrs["squeeze_mask"]) and rank:
        attrs["squeeze_mask"][0] = False  # no rank-0 outputs
    return attrs


def _slice_shape(shape: tuple[int, ...], attrs: dict[str, Any]) -> tuple[int, ...] | None:
    """The slice's shape, or None where coremltools refuses the attributes, its value is
    empty, or its type inference disagrees with its value inference (x[-1:-1] on a
    dimension of 1 is declared (1,)): no valid program."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    with Function({}, opset_version=ct.target.iOS18):
        try:
            # (copies: coremltools writes into a squeezed axis' stride)
            copies = {k: np.copy(v) for k, v in attrs.items()}
            var = mb.slice_by_index(x=np.zeros(shape, np.float32), **copies)
        except ValueError:
            return None
    value = np.asarray(var.val)
    return value.shape if value.size and tuple(var.shape) == value.shape else None


def _slice_by_index(rng: Rng) -> list[Case]:
    out: list[Case] = []
    while len(out) < 40:
        shape = _shape(rng, int(rng.integers(1, 5)), 6)
        attrs = _slice_attrs(rng, shape)
        if _slice_shape(shape, attrs) is None:
            continue
        x = _values(rng, shape, NUMBERS[len(out) % 3])
        out.append(Case("slice_by_index", {"x": x}, attrs))
    return out


def _slice_update(rng: Rng) -> list[Case]:
    out: list[Case] = []
    while len(out) < 24:
        shape = _shape(rng, int(rng.integers(1, 5)), 6)
        attrs = _slice_attrs(rng, shape)
        region = _slice_shape(shape, attrs)
        if region is None or region == ():
            continue
        dtype = NUMBERS[len(out) % 3]
        inputs = {"x": _values(rng, shape, dtype), "update": _values(rng, region, dtype)}
        out.append(Case("slice_update", inputs, attrs))
    return out


CASES: dict[str, Callable[[Rng], list[Case]]] = {
    "add": _binary("add", NUMBERS),
    "sub": _binary("sub", NUMBERS),
    "mul": _binary("mul", NUMBERS),
    "real_div": _binary("real_div", FLOATS),
    "maximum": _binary("maximum", NUMBERS),
    "minimum": _binary("minimum", NUMBERS),
    "abs": _unary("abs", NUMBERS),
    "sqrt": _unary("sqrt", FLOATS, positive=True),
    "silu": _silu,
    "inverse": _epsilon_op("inverse"),
    "rsqrt": _epsilon_op("rsqrt"),
    "clip": _clip,
    "cast": _cast,
    "reduce_max": _reduce("reduce_max"),
    "reduce_mean": _reduce("reduce_mean"),
    "reduce_sum": _reduce("reduce_sum"),
    "reduce_argmax": _reduce_argmax,
    "softmax": _softmax,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "split": _split,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
}
