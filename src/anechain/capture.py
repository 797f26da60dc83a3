"""Ground truth from a Mac, replayable anywhere: `anechain capture`.

For each package, a bundle (one JSON file, arrays zlib-compressed and base64-encoded) holds
what Core ML did with it on this machine: the compute plan with its estimated costs, the
package's program (op kinds, names, dtypes), the compiled model's metadata.json, the inputs
of the golden run and Core ML's outputs for them on CPU_AND_NE and on CPU_ONLY, the states
after the run, the residency and golden results as computed here, and the machine (chip,
macOS, coremltools, Neural Engine cores).

`replay_bundle` puts a bundle back through the same residency code (`report_for_plan`) and
the same golden code (`validate.run_golden`, `head.run_head_golden`, driven by a runner that
replays the recorded outputs after checking it is fed the recorded inputs), and refuses a
bundle whose recorded results differ from the recomputed ones, whose plan does not match
its program, or that has no CPU_AND_NE run.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anechain import __version__
from anechain.checkpoint import Checkpoint
from anechain.config import Config, ValidationSettings, from_dict, to_dict
from anechain.contract import KIND_HEAD, ShardMetadata
from anechain.errors import AnechainError
from anechain.fsutil import atomic_write_text, sha256_tree

CAPTURE_SCHEMA = "anechain.capture/1"
RUN_UNITS = ("cpu_and_ne", "cpu_only")
Progress = Callable[[str], None]


class CaptureError(AnechainError):
    """A capture bundle is unreadable, inconsistent, or says what its contents do not show."""


# --- arrays in JSON -----------------------------------------------------------------------


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    data = base64.b64encode(zlib.compress(a.tobytes(), 9)).decode("ascii")
    return {"dtype": a.dtype.name, "shape": list(a.shape), "zlib_base64": data}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    try:
        raw = zlib.decompress(base64.b64decode(d["zlib_base64"]))
        return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise CaptureError(f"an array of the bundle is unreadable ({exc})") from None


def _encode_all(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: encode_array(np.asarray(v)) for k, v in sorted(arrays.items())}


def _decode_all(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: decode_array(v) for k, v in d.items()}


# --- recording and replaying runners ------------------------------------------------------


class RecordingRunner:
    """Wraps a runner: records every step's inputs and outputs (the golden loop is unchanged)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.name = runner.name
        self.steps: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def reset(self) -> None:
        self.steps = []
        self.runner.reset()

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.step(inputs)
        self.steps.append(({k: v.copy() for k, v in inputs.items()}, out))
        return out

    def read_state(self, name: str) -> np.ndarray:
        return np.asarray(self.runner.read_state(name))


class ReplayRunner:
    """Hands back a recorded run's outputs, step by step, after checking that it is fed the
    inputs Core ML was fed (float inputs within fp16 rounding: the reference was computed on
    another machine)."""

    name = "replay"

    def __init__(
        self,
        inputs: list[dict[str, np.ndarray]],
        outputs: list[dict[str, np.ndarray]],
        states: dict[str, np.ndarray],
    ) -> None:
        self.inputs, self.outputs, self.states = inputs, outputs, states
        self.first_nonfinite: int | None = None
        self.layer_max_abs: list[float] = []
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self._next
        if p >= len(self.outputs):
            raise CaptureError(f"the golden run asks for step {p}; the capture has {p}")
        recorded = self.inputs[p]
        if set(recorded) != set(inputs):
            raise CaptureError(f"step {p}: inputs {sorted(inputs)} vs captured {sorted(recorded)}")
        for k, want in recorded.items():
            got = np.asarray(inputs[k])
            close = (
                np.allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
                if want.dtype.kind == "f"
                else np.array_equal(got, want)
            )
            if got.shape != want.shape or not close:
                raise CaptureError(
                    f"step {p}: input {k!r} differs from the captured one; the bundle was made "
                    "from another checkpoint or calibration"
                )
        self._next += 1
        return {k: v.copy() for k, v in self.outputs[p].items()}

    def read_state(self, name: str) -> np.ndarray:
        if name not in self.states:
            raise CaptureError(f"the capture has no state {name!r}")
        return self.states[name].copy()


# --- the golden run (the same code validate uses) -----------------------------------------


def _golden(
    runner: Any,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None,
) -> dict[str, Any]:
    """Gates and metrics of one golden run, as validate computes them."""
    from anechain.head import run_head_golden
    from anechain.validate import GoldenResult, apply_head_gates, run_golden

    if meta.kind == KIND_HEAD:
        head = run_head_golden(runner, meta, checkpoint, settings, cache_dir)
        gates = apply_head_gates(head["metrics"], settings.gates)
        golden = GoldenResult(
            head["metrics"],
            head["per_step"],
            head["first_nonfinite"],
            {},
            all(g.passed for g in gates),
        )
    else:
        golden, gates = run_golden(runner, meta, checkpoint, settings, cache_dir)
    return {
        "metrics": golden.metrics,
        "gates": {g.name: g.passed for g in gates},
        "passed": golden.passed,
    }


# --- capture (macOS) ----------------------------------------------------------------------


@dataclass
class CaptureSeams:
    """Replacements for Core ML and the machine probe (tests write bundles with these)."""

    load_model: Any = None  # runners.coreml ModelLoader
    load_plan: Any = None  # residency PlanLoader
    compiler: Any = None  # compile.Compiler
    machine: dict[str, Any] | None = None


def capture_package(
    package: Path,
    checkpoint: Checkpoint,
    config: Config,
    out_dir: Path,
    *,
    random_recipe: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    seams: CaptureSeams | None = None,
    progress: Progress | None = None,
) -> Path:
    """Compile `package` once, read its plan, run its golden check on CPU_AND_NE and on
    CPU_ONLY, and write `<out_dir>/<stem>.capture.json`."""
    from anechain.compile import compile_to
    from anechain.contract import read_package_metadata
    from anechain.package import load_spec, user_metadata
    from anechain.platform import machine_info
    from anechain.residency import (
        NO_ANE_REASON,
        load_live_plan,
        program_from_spec,
        report_for_plan,
    )
    from anechain.runners.coreml import CoreMLRunner
    from anechain.validate import check_package_matches

    seams = seams or CaptureSeams()
    say = progress or (lambda msg: None)
    package = Path(package)
    meta = read_package_metadata(package)
    check_package_matches(meta, checkpoint, str(package))
    spec = load_spec(package)
    program = program_from_spec(spec)
    machine = seams.machine or machine_info()
    sha = sha256_tree(package)
    with tempfile.TemporaryDirectory(prefix="anechain-capture-") as tmp:
        compiled = Path(tmp) / (package.stem + ".mlmodelc")
        say(f"[{package.name}] compiling")
        compile_to(package, compiled, seams.compiler)
        compiled_meta = json.loads((compiled / "metadata.json").read_text())
        plan = load_live_plan(
            compiled,
            "cpu_and_ne",
            model=package.name,
            package_sha256=sha,
            load_plan=seams.load_plan,
        )
        ane = bool(machine.get("neural_engine_cores"))
        residency = report_for_plan(
            plan,
            program,
            config.residency,
            report_only=not ane,
            plan_source="live",
            reason="" if ane else NO_ANE_REASON,
            where=package.name,
        )
        runs: dict[str, Any] = {}
        inputs: list[dict[str, Any]] = []
        for units in RUN_UNITS:
            say(f"[{package.name}] golden run on {units}")
            runner = RecordingRunner(
                CoreMLRunner(package, units, compiled=compiled, load_model=seams.load_model)
            )
            golden = _golden(runner, meta, checkpoint, config.validation, cache_dir)
            if not inputs:
                inputs = [_encode_all(i) for i, _ in runner.steps]
            runs[units] = {
                "outputs": [_encode_all(o) for _, o in runner.steps],
                "states": _encode_all({s: runner.read_state(s) for s in runner.runner.state_names}),
                "golden": golden,
            }
    bundle = {
        "schema": CAPTURE_SCHEMA,
        "anechain": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "package": {"name": package.name, "sha256": sha, "metadata": user_metadata(spec)},
        "checkpoint": {"fingerprint": checkpoint.fingerprint, "random": random_recipe},
        "validation": to_dict(config.validation),
        "residency_settings": to_dict(config.residency),
        "program": program.to_dict(),
        "compiled_metadata": compiled_meta,
        "plan": plan.to_dict(),
        "residency": residency.to_dict(),
        "inputs": inputs,
        "runs": runs,
    }
    out = Path(out_dir) / f"{package.stem}.capture.json"
    atomic_write_text(out, json.dumps(bundle, indent=1, sort_keys=True, allow_nan=False) + "\n")
    say(f"[{package.name}] wrote {out}")
    return out


# --- replay (any OS) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """What a bundle shows, recomputed: residency and a golden result per compute units."""

    path: Path
    residency: Any  # residency.ResidencyReport
    golden: dict[str, dict[str, Any]]
    machine: dict[str, Any]

    @property
    def verdict(self) -> str:
        ok = self.residency.passed is not False and self.golden["cpu_and_ne"]["passed"]
        return "pass" if ok else "fail"


def read_bundle(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != CAPTURE_SCHEMA:
        raise CaptureError(f"{path} is not an anechain capture ({CAPTURE_SCHEMA})")
    return data


def _same(recorded: Any, recomputed: Any, what: str, where: str) -> None:
    if recorded != recomputed:
        raise CaptureError(f"{where}: the bundle says {what} {recorded!r}; it shows {recomputed!r}")


def _close(recorded: dict[str, Any], recomputed: dict[str, Any], where: str) -> None:
    for key, want in recomputed.items():
        got = recorded.get(key)
        both_num = isinstance(got, int | float) and isinstance(want, int | float)
        if both_num and math.isclose(got, want, rel_tol=1e-2, abs_tol=1e-3):
            continue
        if got != want:
            raise CaptureError(f"{where}: the bundle says {key} = {got!r}; replay gives {want!r}")


def _check_states(
    states: dict[str, np.ndarray], meta: ShardMetadata, steps: int, where: str
) -> None:
    """Every declared state, with its shape and dtype, finite, written at 0..steps-1 only."""
    for spec in meta.contract.states:
        if spec.name not in states:
            raise CaptureError(f"{where}: no state {spec.name!r}")
        value = states[spec.name]
        if value.shape != spec.shape or value.dtype != np.dtype(spec.dtype):
            raise CaptureError(
                f"{where}: state {spec.name!r} is {value.dtype}{list(value.shape)}, the contract "
                f"says {spec.dtype}{list(spec.shape)}"
            )
        if not np.isfinite(value).all():
            raise CaptureError(f"{where}: state {spec.name!r} holds NaN/Inf")
        # (layers, kv_heads, context, head_dim): position p is written at step p.
        if np.any(value[:, :, steps:, :]) or not np.all(
            np.any(value[:, :, :steps, :], axis=(1, 3))
        ):
            raise CaptureError(
                f"{where}: state {spec.name!r} is not written at exactly 0..{steps - 1}"
            )


def _check_compiled_metadata(compiled_meta: Any, meta: ShardMetadata, where: str) -> None:
    """The compiled model's metadata.json, read as the Core ML runner reads it, describes the
    package's contract (states only if it has a `stateSchema`)."""
    from anechain.runners.coreml import features_from_compiled

    with tempfile.TemporaryDirectory(prefix="anechain-replay-") as tmp:
        compiled = Path(tmp) / "model.mlmodelc"
        compiled.mkdir()
        (compiled / "metadata.json").write_text(json.dumps(compiled_meta))
        try:
            found = features_from_compiled(compiled)
        except AnechainError as exc:
            raise CaptureError(f"{where}: {exc}") from None
    expected = (meta.contract.inputs, meta.contract.outputs, meta.contract.states)
    for kind, got, want in zip(("inputs", "outputs", "states"), found, expected, strict=True):
        if kind == "states" and not got:
            continue  # no stateSchema: the runner asks the package
        if sorted((f.name, f.shape, f.dtype.name) for f in got) != sorted(
            (t.name, tuple(t.shape), t.dtype) for t in want
        ):
            raise CaptureError(f"{where}: the compiled model's {kind} differ from the contract")


def replay_bundle(
    path: str | Path, checkpoint: Checkpoint, cache_dir: Path | None = None
) -> Replay:
    """Recompute a bundle's residency and golden results; CaptureError if it says otherwise."""
    from anechain.config import ResidencySettings
    from anechain.residency import NO_ANE_REASON, ComputePlan, Program, report_for_plan

    path = Path(path)
    data = read_bundle(path)
    where = f"{path.name}"
    try:
        meta = ShardMetadata.from_user_metadata(data["package"]["metadata"], where)
        settings = from_dict(ValidationSettings, data["validation"], "validation")
        res_settings = from_dict(ResidencySettings, data["residency_settings"], "residency")
        plan = ComputePlan.from_dict(data["plan"], where=f"{where} plan")
        program = Program.from_dict(data["program"], where=f"{where} program")
        machine = dict(data["machine"])
        runs = data["runs"]
        inputs = [_decode_all(i) for i in data["inputs"]]
    except (KeyError, TypeError) as exc:
        raise CaptureError(f"{where} lacks {exc}") from None
    if checkpoint.fingerprint != data["checkpoint"]["fingerprint"]:
        raise CaptureError(f"{where} was captured from another checkpoint")
    if plan.package_sha256 != data["package"]["sha256"]:
        raise CaptureError(f"{where}: the plan was made for another package")
    if "cpu_and_ne" not in runs:
        raise CaptureError(
            f"{where} has no CPU_AND_NE run (CPU_ONLY computes in fp32 and proves nothing "
            "about the Neural Engine)"
        )
    _check_compiled_metadata(data.get("compiled_metadata"), meta, where)
    ane = bool(machine.get("neural_engine_cores"))
    residency = report_for_plan(
        plan,
        program,
        res_settings,
        report_only=not ane,
        plan_source=f"capture:{path.name}",
        reason="" if ane else NO_ANE_REASON,
        where=where,
    )
    claimed = data["residency"]
    _same(claimed.get("status"), residency.status, "residency status", where)
    _same(claimed.get("passed"), residency.passed, "residency passed", where)
    _same(claimed.get("counts"), residency.counts.to_dict(), "residency counts", where)

    golden = {}
    for units, run in runs.items():
        outputs = [_decode_all(o) for o in run["outputs"]]
        states = _decode_all(run["states"])
        runner = ReplayRunner(inputs, outputs, states)
        result = _golden(runner, meta, checkpoint, settings, cache_dir)
        if runner._next != len(outputs):
            raise CaptureError(
                f"{where}: {units} has {len(outputs)} steps; the run used {runner._next}"
            )
        recorded = run["golden"]
        _same(recorded.get("gates"), result["gates"], f"{units} gates", where)
        _same(recorded.get("passed"), result["passed"], f"{units} golden passed", where)
        _close(recorded.get("metrics", {}), result["metrics"], f"{where} {units}")
        if meta.kind != KIND_HEAD:
            _check_states(states, meta, len(outputs), f"{where} {units}")
        golden[units] = result
    return Replay(path, residency, golden, machine)


def verify_random_recipe(checkpoint: Checkpoint, preset: str, seed: int) -> dict[str, Any]:
    """{'preset', 'seed'} if `anechain random-checkpoint --preset P --seed S` remakes
    `checkpoint` (same fingerprint); CaptureError otherwise."""
    from anechain.checkpoint import write_random_checkpoint
    from anechain.config import load_preset

    with tempfile.TemporaryDirectory(prefix="anechain-recipe-") as tmp:
        remade = write_random_checkpoint(
            Path(tmp) / "ckpt", load_preset(preset).architecture, seed=seed
        )
        if Checkpoint(remade).fingerprint != checkpoint.fingerprint:
            raise CaptureError(
                f"{checkpoint.path} is not the random {preset} checkpoint of seed {seed}"
            )
    return {"preset": preset, "seed": seed}
