"""The `mil` runner's ops against coremltools itself, over seeded random shapes and attributes.

Every instance of an op is built with coremltools' MIL builder, so coremltools validates
its attributes; the instances of one op type go into one saved program (no graph passes),
which `MILRunner` loads and runs like a shard. The reference is coremltools' own value
inference of the same op on the same input values, evaluated in float32 and rounded once to
the declared dtype: Core ML computes fp16 ops at higher precision and rounds the output,
which is what the runner emulates. Where coremltools has no value inference (silu, conv,
states, constexpr weights) or an incomplete one (concat ignores `interleave`), the reference
is the op's documented semantics in float64 (tests/mil_references.py; the random
instances are drawn in tests/mil_cases.py).

Tolerances come from the output dtype, not from constants: integer outputs and data
movement are exact; elementwise arithmetic is exact too (the runner and coremltools compute
the same float32 expression); ops that sum n terms may differ by one ulp of the output
dtype plus the float32 accumulation bound n * 2**-24 * sum|terms|.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.mil_cases import CASES
from tests.mil_references import Case, Constexpr, conv_reference

from anechain.errors import RunnerError
from anechain.runners import mil_ops
from anechain.runners.mil import MILRunner
from anechain.runners.mil_ops import INPUTS, OPS, ints

EPS32 = 2.0**-24


def _f32(v: Any) -> Any:
    """fp16 values as float32 (exact): the reference computes at higher precision. Copies,
    since coremltools may write into what it is given."""
    if isinstance(v, list):
        return [_f32(a) for a in v]
    if isinstance(v, (np.ndarray, np.generic)):
        return v.astype(np.float32) if v.dtype == np.float16 else np.copy(v)
    return v


def _abs(v: Any) -> Any:
    if isinstance(v, list):
        return [_abs(a) for a in v]
    if isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind == "f":
        return np.abs(v)
    if isinstance(v, Constexpr):
        return np.abs(v.value())
    return v


def _outputs(res: Any) -> list[Any]:
    return list(res) if isinstance(res, (list, tuple)) else [res]


def _coremltools_values(case: Case, inputs: dict[str, Any], attrs: dict[str, Any]) -> list[Any]:
    """coremltools' value inference of the op on these (const) inputs."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    with Function({}, opset_version=ct.target.iOS18):
        res = getattr(mb, case.op)(**inputs, **attrs)
    values = [v.val for v in _outputs(res)]
    assert all(v is not None for v in values), f"coremltools cannot evaluate {case.op}"
    return [np.asarray(v) for v in values]


def _reference(case: Case, absolute: bool = False) -> list[np.ndarray]:
    conv = _abs if absolute else _f32
    inputs = {k: conv(v) for k, v in case.inputs.items()}
    attrs = {k: conv(v) for k, v in case.attrs.items()}
    if case.reference is not None:
        return [np.asarray(v, np.float64) for v in _outputs(case.reference(**inputs, **attrs))]
    attrs = {k: v.value() if isinstance(v, Constexpr) else v for k, v in attrs.items()}
    return _coremltools_values(case, inputs, attrs)


def _scale(case: Case, want: list[np.ndarray]) -> list[np.ndarray] | None:
    """Per output element, sum|terms| of what the op sums (the op on |inputs|), or |output|
    for ops whose float32 error is relative; None for ops compared exactly."""
    if not case.terms:
        return None
    return [np.abs(w) for w in want] if case.relative else _reference(case, absolute=True)


class Suite:
    """The cases of one op type, saved as one program, with their references."""

    def __init__(self, cases: list[Case], path: Path) -> None:
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import Function, Program, types

        self.cases, self.path = cases, path
        specs: dict[str, Any] = {}
        self.feeds: dict[str, np.ndarray] = {}
        for i, case in enumerate(cases):
            for key, v in case.inputs.items():
                for j, arr in enumerate(v if isinstance(v, list) else [v]):
                    name = f"c{i}_{key}{j}"
                    dtype = types.numpy_type_to_builtin_type(arr.dtype)
                    specs[name] = mb.TensorSpec(shape=arr.shape, dtype=dtype)
                    self.feeds[name] = arr
        self.outputs: list[list[tuple[str, np.dtype[Any]]]] = []
        with Function(specs, opset_version=ct.target.iOS18) as func:
            outs = []
            for i, case in enumerate(cases):
                args: dict[str, Any] = {}
                for key, v in case.inputs.items():
                    names = [f"c{i}_{key}{j}" for j in range(len(v) if isinstance(v, list) else 1)]
                    vars_ = [func.inputs[n] for n in names]
                    args[key] = vars_ if isinstance(v, list) else vars_[0]
                attrs = {
                    k: v.var() if isinstance(v, Constexpr) else v for k, v in case.attrs.items()
                }
                res = _outputs(getattr(mb, case.op)(**args, **attrs, name=f"case{i}"))
                self.outputs.append(
                    [(r.name, np.dtype(types.nptype_from_builtin(r.dtype))) for r in res]
                )
                outs.extend(res)
            func.set_outputs(outs)
        prog = Program()
        prog.add_function("main", func)
        _save(prog, path)
        self.want = [_reference(c) for c in cases]
        self.scale = [_scale(c, want) for c, want in zip(cases, self.want, strict=True)]

    def check(self) -> None:
        """AssertionError (or RunnerError) unless the runner matches every reference."""
        got = MILRunner(self.path, track_activations=False).step(self.feeds)
        for i, case in enumerate(self.cases):
            for j, (name, dtype) in enumerate(self.outputs[i]):
                scale = self.scale[i]
                slack = 0.0 if scale is None else case.terms * EPS32 * scale[j].astype(np.float64)
                _compare(got[name], self.want[i][j], dtype, case.ulps, slack, f"{case}")


def _compare(
    got: np.ndarray, want: np.ndarray, dtype: np.dtype[Any], ulps: int, slack: Any, what: str
) -> None:
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, declared {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    rounded = want.astype(dtype)  # the reference, rounded once to the declared dtype
    if dtype.kind != "f" or ulps == 0:
        np.testing.assert_array_equal(got, rounded, err_msg=what)
        return
    finite = np.isfinite(rounded)
    np.testing.assert_array_equal(got[~finite], rounded[~finite], err_msg=what)
    g, w = got[finite].astype(np.float64), want.astype(np.float64)[finite]
    bound = ulps * np.spacing(np.abs(rounded[finite])).astype(np.float64)
    bound = bound + (np.broadcast_to(slack, want.shape)[finite] if np.ndim(slack) else slack)
    err = np.abs(g - w)
    worst = int(np.argmax(err - bound)) if err.size else 0
    assert np.all(err <= bound), (
        f"{what}: |runner - reference| = {err[worst]:.3g} > {bound[worst]:.3g} "
        f"(runner {g[worst]:.6g}, reference {w[worst]:.6g})"
    )


@pytest.fixture(scope="module")
def suites(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Suite]:
    root = tmp_path_factory.mktemp("mil_ops")
    built: dict[str, Suite] = {}

    def get(op: str) -> Suite:
        if op not in built:
            rng = np.random.default_rng(sorted(CASES).index(op))
            built[op] = Suite(CASES[op](rng), root / f"{op}.mlpackage")
        return built[op]

    return get


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_matches_coremltools(op: str, suites: Callable[[str], Suite]) -> None:
    suites(op).check()


def test_every_registered_op_is_checked() -> None:
    # read_state / coreml_update_state: test_states_read_and_write below.
    assert set(OPS) - set(CASES) == {"read_state", "coreml_update_state"}


def test_every_coremltools_input_is_implemented() -> None:
    """The runner's input table is coremltools' iOS18 input spec of each op, no more, no less."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Function
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    assert set(INPUTS) == set(OPS)
    with Function({}, opset_version=ct.target.iOS18):
        for op, names in INPUTS.items():
            if op in SSAOpRegistry.dialect_ops:
                cls = SSAOpRegistry.dialect_ops[op]
            else:
                cls = SSAOpRegistry._get_core_op_cls(op)
            assert set(cls.input_spec.input_types) == names, op


# --- mutants: a plausible wrong op must fail its check ----------------------------------------


OPS_REAL = dict(OPS)  # the registry as shipped (mutants call it, never the patched one)


def _with(op: str, **changed: Any) -> Any:
    """The op, run with some of its inputs replaced (an attribute ignored)."""
    real = OPS[op]
    return lambda step, a, states: real(step, {**a, **changed}, states)


def _without(op: str, *dropped: str) -> Any:
    real = OPS[op]
    return lambda step, a, states: real(
        step, {k: v for k, v in a.items() if k not in dropped}, states
    )


def _swapped(op: str) -> Any:
    real = OPS[op]
    return lambda step, a, states: real(step, {"x": a["y"], "y": a["x"]}, states)


def _times(op: str, factor: float) -> Any:
    real = OPS[op]
    return lambda step, a, states: factor * real(step, a, states)


def _float32_ints(fn: Callable[[Any, Any], Any]) -> Any:
    """Integers computed in float32, as a float-only interpreter would."""
    return lambda step, a, states: fn(
        np.asarray(a["x"], np.float32), np.asarray(a["y"], np.float32)
    )


def _squeeze_ignores_begin_mask() -> Any:
    """The reviewed bug: a squeezed axis picks begin[i] even when begin_mask[i] is set."""
    real = OPS["slice_by_index"]

    def run(step: Any, a: dict[str, Any], states: Any) -> Any:
        if a.get("begin_mask") is None or a.get("squeeze_mask") is None:
            return real(step, a, states)
        mask = np.asarray(a["begin_mask"]) & ~np.asarray(a["squeeze_mask"])
        return real(step, {**a, "begin_mask": mask}, states)

    return run


def _cast_rounds() -> Any:
    real = OPS["cast"]

    def run(step: Any, a: dict[str, Any], states: Any) -> Any:
        out = real(step, a, states)
        return np.rint(out) if step.out_dtypes[0].kind == "i" else out

    return run


def _silu_sigmoid_approx(step: Any, a: dict[str, Any], states: Any) -> Any:
    x = np.asarray(a["x"], np.float32)
    return x / (1 + np.exp(-1.702 * x))  # the GELU approximation, not SiLU


def _transpose_reversed(step: Any, a: dict[str, Any], states: Any) -> Any:
    return np.transpose(np.asarray(a["x"]))


def _reshape_left_aligned(step: Any, a: dict[str, Any], states: Any) -> Any:
    x, shape = np.asarray(a["x"]), ints(a["shape"])  # iOS15's rule applied to any rank
    return x.reshape([x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)])


def _expand_dims_input_rank(step: Any, a: dict[str, Any], states: Any) -> Any:
    x = np.asarray(a["x"])  # negative axes counted from the input's rank, not the output's
    return np.expand_dims(x, tuple(d + x.ndim if d < 0 else d for d in ints(a["axes"])))


# Wrong values of the right shape: each must fail its op's value comparison.
VALUE_MUTANTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "conv returns zeros": ("conv", lambda: _times("conv", 0.0)),
    "matmul ignores transpose_x": ("matmul", lambda: _with("matmul", transpose_x=False)),
    "matmul ignores transpose_y": ("matmul", lambda: _with("matmul", transpose_y=False)),
    "concat ignores interleave": ("concat", lambda: _with("concat", interleave=False)),
    "slice squeezes begin under begin_mask": ("slice_by_index", _squeeze_ignores_begin_mask),
    "slice ignores begin_mask": (
        "slice_by_index",
        lambda: _without("slice_by_index", "begin_mask"),
    ),
    "softmax on the last axis": ("softmax", lambda: _without("softmax", "axis")),
    "rsqrt ignores epsilon": ("rsqrt", lambda: _without("rsqrt", "epsilon")),
    "inverse ignores epsilon": ("inverse", lambda: _without("inverse", "epsilon")),
    "clip ignores beta": ("clip", lambda: _with("clip", beta=np.float32(np.inf))),
    "add of int32 in float32": ("add", lambda: _float32_ints(np.add)),
    "mul of int32 in float32": ("mul", lambda: _float32_ints(np.multiply)),
    "sub reversed": ("sub", lambda: _swapped("sub")),
    "reduce_mean as a sum": ("reduce_mean", lambda: OPS_REAL["reduce_sum"]),
    "cast to int32 rounds": ("cast", _cast_rounds),
    "silu as x * sigmoid(1.702 x)": ("silu", lambda: _silu_sigmoid_approx),
    "transpose reverses the axes": ("transpose", lambda: _transpose_reversed),
}

# Wrong shapes: the runner's check against the declared shape must refuse them.
SHAPE_MUTANTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "reduce_mean ignores keep_dims": ("reduce_mean", lambda: _without("reduce_mean", "keep_dims")),
    "reduce_argmax ignores keep_dims": (
        "reduce_argmax",
        lambda: _without("reduce_argmax", "keep_dims"),
    ),
    "reshape aligns 0 from the left": ("reshape", lambda: _reshape_left_aligned),
    "expand_dims counts from the input rank": ("expand_dims", lambda: _expand_dims_input_rank),
    "split ignores split_sizes": ("split", lambda: _without("split", "split_sizes")),
    "slice ignores end_mask": ("slice_by_index", lambda: _without("slice_by_index", "end_mask")),
    "slice ignores stride": ("slice_by_index", lambda: _without("slice_by_index", "stride")),
    "slice_update ignores stride": ("slice_update", lambda: _without("slice_update", "stride")),
}


def _same_shape(real: Any, mutant: Any) -> Any:
    """The mutant where it gives the real op's shape, else the real op: only values differ."""

    def run(step: Any, a: dict[str, Any], states: Any) -> Any:
        want = real(step, a, states)
        try:
            got = mutant(step, a, states)
        except Exception:  # an error would reveal it: fall back to the real op
            return want
        return got if np.shape(got) == np.shape(want) else want

    return run


@pytest.mark.parametrize("mutant", sorted(VALUE_MUTANTS))
def test_a_wrong_value_fails_its_check(
    mutant: str, suites: Callable[[str], Suite], monkeypatch: pytest.MonkeyPatch
) -> None:
    op, make = VALUE_MUTANTS[mutant]
    suite = suites(op)
    monkeypatch.setitem(OPS, op, _same_shape(OPS[op], make()))
    with pytest.raises(AssertionError, match=rf"{op}\{{"):  # the failing case, named
        suite.check()


@pytest.mark.parametrize("mutant", sorted(SHAPE_MUTANTS))
def test_a_wrong_shape_fails_its_check(
    mutant: str, suites: Callable[[str], Suite], monkeypatch: pytest.MonkeyPatch
) -> None:
    op, make = SHAPE_MUTANTS[mutant]
    suite = suites(op)
    monkeypatch.setitem(OPS, op, make())
    with pytest.raises(RunnerError, match=rf"\({op}\)"):  # the op, named
        suite.check()


# --- states, refusals --------------------------------------------------------------------------


def _save(prog: Any, path: Path) -> Path:
    """The program as an iOS18 .mlpackage, ops as built (no graph passes).

    coremltools' own converter entry, minus `ct.convert`'s wrapper (whose gc.collect() costs
    ~0.6s per program in a process holding torch).
    """
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert

    mlmodel = mil_convert(
        prog,
        convert_from="milinternal",
        convert_to="mlprogram",
        compute_units=ct.ComputeUnit.ALL,
        specification_version=ct.target.iOS18,
        main_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    mlmodel.save(str(path))
    return path


def _state_program(path: Path, before_read_late: bool = True) -> Path:
    """Write `row` at `position` into a (1, 2, 8, 4) cache; return the cache before and after.
    `before_read_late`: the output `before` is computed after the write (else before it)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [
        mb.StateTensorSpec(shape=(1, 2, 8, 4), dtype=types.fp16),
        mb.TensorSpec(shape=(1, 2, 1, 4), dtype=types.fp16),
        mb.TensorSpec(shape=(1,), dtype=types.int32),
    ]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(cache: Any, row: Any, position: Any) -> Any:
        zero = np.array([0, 0], np.int32)
        begin = mb.concat(values=[zero, position, np.array([0], np.int32)], axis=0)
        before = mb.read_state(input=cache)
        early = None if before_read_late else mb.mul(x=before, y=np.float16(1), name="before")
        written = mb.slice_update(
            x=before,
            update=row,
            begin=begin,
            end=mb.add(x=begin, y=np.int32(1)),
            end_mask=[True, True, False, True],
        )
        mb.coreml_update_state(state=cache, value=written)
        after = mb.read_state(input=cache)
        late = mb.mul(x=before, y=np.float16(1), name="before") if early is None else early
        return late, mb.mul(x=after, y=np.float16(1), name="after")

    return _save(prog, path)


def _check_states(runner: MILRunner) -> None:
    """read_state gives the content before this step's write, coreml_update_state writes."""
    rng = np.random.default_rng(0)
    cache = np.zeros((1, 2, 8, 4), np.float16)
    for position in (0, 3, 7, 3):
        row = rng.standard_normal((1, 2, 1, 4)).astype(np.float16)
        out = runner.step({"row": row, "position": np.array([position], np.int32)})
        np.testing.assert_array_equal(out["before"], cache)
        cache[:, :, position] = row[:, :, 0]
        np.testing.assert_array_equal(out["after"], cache)
        np.testing.assert_array_equal(runner.read_state("cache"), cache)
    runner.reset()
    assert not runner.read_state("cache").any()


def test_states_read_and_write(tmp_path: Path) -> None:
    _check_states(MILRunner(_state_program(tmp_path / "state.mlpackage")))


def test_a_state_is_written_in_place_only_when_its_old_value_is_dead(tmp_path: Path) -> None:
    """The cache write skips its copy when nothing reads the old cache afterwards; where
    something does (the old value read after the write), the write copies, and both give
    Core ML's values."""
    late = MILRunner(_state_program(tmp_path / "late.mlpackage"))
    assert not [s.name for s in late._steps if s.extra.get("in_place")]
    _check_states(late)
    early = MILRunner(_state_program(tmp_path / "early.mlpackage", before_read_late=False))
    assert [s.op_type for s in early._steps if s.extra.get("in_place")] == ["slice_update"]
    _check_states(early)


STATE_MUTANTS: dict[str, tuple[str, Any]] = {
    "update_state does not write": ("coreml_update_state", lambda step, a, states: a["value"]),
    "read_state reads zeros": (
        "read_state",
        lambda step, a, states: np.zeros_like(states[a["input"].name]),
    ),
}


@pytest.mark.parametrize("mutant", sorted(STATE_MUTANTS))
def test_a_wrong_state_op_fails_its_check(
    mutant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    op, fn = STATE_MUTANTS[mutant]
    monkeypatch.setitem(OPS, op, fn)
    runner = MILRunner(_state_program(tmp_path / "state.mlpackage"))
    with pytest.raises(AssertionError):
        _check_states(runner)


def _tiny_program(path: Path) -> Path:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [mb.TensorSpec(shape=(2, 3), dtype=types.fp16), mb.TensorSpec((3,), types.int32)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x: Any, i: Any) -> Any:
        y = mb.matmul(x=x, y=mb.cast(x=mb.reshape(x=i, shape=[3, 1]), dtype="fp16"), name="mm")
        return mb.add(x=y, y=np.float16(1), name="out")

    return _save(prog, path)


def test_inputs_of_another_dtype_are_refused(tmp_path: Path) -> None:
    runner = MILRunner(_tiny_program(tmp_path / "tiny.mlpackage"))
    x, i = np.ones((2, 3), np.float16), np.array([1, 2, 3], np.int32)
    assert runner.step({"x": x, "i": i})["out"].tolist() == [[7.0], [7.0]]
    msg = r"input 'x' has dtype float32 and shape \(2, 3\), the program declares float16 \(2, 3\)"
    with pytest.raises(RunnerError, match=msg):
        runner.step({"x": x.astype(np.float32), "i": i})
    msg = r"input 'i' has dtype int64 and shape \(3,\), the program declares int32 \(3,\)"
    with pytest.raises(RunnerError, match=msg):
        runner.step({"x": x, "i": i.astype(np.int64)})


def test_an_input_the_runner_does_not_implement_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if coremltools' matmul gained an input: the runner refuses it at load, by name."""
    package = _tiny_program(tmp_path / "tiny.mlpackage")
    monkeypatch.setitem(mil_ops.INPUTS, "matmul", frozenset({"x", "y", "transpose_x"}))
    with pytest.raises(RunnerError, match=r"op 'mm' \(matmul\) has input 'transpose_y'"):
        MILRunner(package)


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"groups": 2}, "groups=2"),
        ({"pad_type": "custom", "pad": [1, 0, 0, 1]}, r"pad=\[1, 0, 0, 1\]"),
    ],
)
def test_convs_the_runner_does_not_compute_are_refused(
    tmp_path: Path, attrs: dict[str, Any], match: str
) -> None:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    groups = attrs.get("groups", 1)
    weight = np.ones((4, 4 // groups, 1, 1), np.float16)

    @mb.program(
        input_specs=[mb.TensorSpec((1, 4, 3, 3), types.fp16)], opset_version=ct.target.iOS18
    )
    def prog(x: Any) -> Any:
        return mb.conv(x=x, weight=weight, name="c", **attrs)

    with pytest.raises(RunnerError, match=match):
        MILRunner(_save(prog, tmp_path / "conv.mlpackage"))


def test_conv_reference_is_torch_conv() -> None:
    """The conv reference (documented semantics) against torch, on a case it covers fully."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 7))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    got = conv_reference(
        x,
        w,
        bias=b,
        strides=[2, 1],
        pad_type="custom",
        pad=[1, 2, 0, 1],
        dilations=[1, 2],
        groups=2,
    )
    want = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.from_numpy(x), (0, 1, 1, 2)),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_each_op_rounds_to_its_declared_dtype(tmp_path: Path) -> None:
    """fp16 ops round their own output (a chain computed in float32 would not); fp32 ops
    keep float32; int32 ops stay exact beyond float32's 24 bits."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [mb.TensorSpec((4,), types.fp16), mb.TensorSpec((2,), types.int32)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x: Any, i: Any) -> Any:
        big = mb.add(x=x, y=np.float16(2048))  # fp16 spacing at 2048: 2
        half = mb.sub(x=big, y=np.float16(2048), name="half")
        wide = mb.cast(x=x, dtype="fp32")
        fine = mb.sub(x=mb.add(x=wide, y=np.float32(2048)), y=np.float32(2048), name="fine")
        exact = mb.sub(x=mb.add(x=i, y=np.int32(2**30)), y=np.int32(2**30), name="exact")
        return half, fine, exact

    runner = MILRunner(_save(prog, tmp_path / "rounding.mlpackage"))
    x = np.array([0.5, 1.0, 1.5, -2.75], np.float16)
    i = np.array([1, -(2**29) - 1], np.int32)
    out = runner.step({"x": x, "i": i})
    want = ((x + np.float16(2048)) - np.float16(2048)).astype(np.float16)  # numpy fp16 per op
    assert out["half"].dtype == np.float16 and out["half"].tolist() == want.tolist()
    assert want.tolist() != x.tolist()  # the rounding is visible
    assert out["fine"].dtype == np.float32 and out["fine"].tolist() == x.astype(np.float32).tolist()
    assert out["exact"].dtype == np.int32 and out["exact"].tolist() == i.tolist()


def test_fp16_casts_round_as_numpy_does() -> None:
    """The runner's float16 <-> float32 casts (torch, vectorized) give numpy's bits: every
    float16 bit pattern up, and float32 values across the whole range down (ties, subnormals,
    overflow to inf, NaN)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    up = mil_ops.astype(every, np.dtype(np.float32))
    want = every.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(up), nan)
    assert np.array_equal(up[~nan].view(np.uint32), want[~nan].view(np.uint32))

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([bits.view(np.float32), want])
    # float32 values halfway between two float16s (round half to even decides them)
    with np.errstate(invalid="ignore"):  # inf + -inf across the sign boundary: dropped
        halfway = (every[:-1].astype(np.float32) + every[1:].astype(np.float32)) / 2
    values = np.concatenate([values, halfway[np.isfinite(halfway)]])
    down = mil_ops.astype(values, np.dtype(np.float16))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the point
        want16 = values.astype(np.float16)
    nan16 = np.isnan(want16)
    assert np.array_equal(np.isnan(down), nan16)
    assert np.array_equal(down[~nan16].view(np.uint16), want16[~nan16].view(np.uint16))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_diagnostics_peak_is_numpys(dtype: Any) -> None:
    """The per-op peak |value| (torch for large outputs) is numpy's: NaN wherever a NaN is,
    else inf wherever an inf is, else the largest magnitude."""
    from anechain.runners.mil import _max_abs

    rng = np.random.default_rng(1)
    for size in (100, 10_000):
        x = (rng.standard_normal(size) * 300).astype(dtype)
        assert _max_abs(x) == float(np.max(np.abs(x)))
        x[size // 3] = -np.inf
        assert _max_abs(x) == np.inf
        x[size // 2] = np.nan
        assert np.isnan(_max_abs(x))
