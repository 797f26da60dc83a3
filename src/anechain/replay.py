"""Replaying a capture bundle (any OS) through the same residency code (`report_for_plan`)
and the same golden code (`validate.run_golden`, `head.run_head_golden`, driven by a runner
that hands back the recorded outputs after checking it is fed the recorded inputs).

A bundle is refused when its recorded results differ from the recomputed ones, when its plan
does not match its program or was made for units without the Neural Engine, when it has no
CPU_AND_NE run, or when its states contradict the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anechain.capture import CaptureError, decode_all, golden_run, read_bundle
from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings, from_dict
from anechain.contract import KIND_HEAD, ShardMetadata


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


@dataclass(frozen=True)
class Replay:
    """What a bundle shows, recomputed: residency and a golden result per compute units."""

    path: Path
    residency: Any  # residency.ResidencyReport
    golden: dict[str, dict[str, Any]]
    machine: dict[str, Any]

    @property
    def verdict(self) -> str:
        """pass / fail; `unproven` for a Mac without a Neural Engine (residency counted, not
        gated, and its CPU_AND_NE run never touched the Neural Engine)."""
        if self.residency.passed is False or not self.golden["cpu_and_ne"]["passed"]:
            return "fail"
        return "pass" if self.residency.passed else "unproven"


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


def _check_compiled_metadata(compiled_meta: Any, where: str) -> None:
    """The bundle must carry the compiled model's metadata.json as Core ML wrote it (a JSON
    object or a list of them): strict, the bundle's format is ours. Its contents are not
    interpreted: lenient, their layout is Core ML's and undocumented (one entry per function
    or not, states or not), so it is kept as evidence, not checked against the contract. The
    strict checks are on our data: the package's metadata, the inputs fed, the states."""
    entries = compiled_meta if isinstance(compiled_meta, list) else [compiled_meta]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise CaptureError(
            f"{where}: the compiled model's metadata.json is unreadable (a JSON object or a "
            "list of them, as Core ML writes it)"
        )


def replay_bundle(
    path: str | Path, checkpoint: Checkpoint, cache_dir: Path | None = None
) -> Replay:
    """Recompute a bundle's residency and golden results; CaptureError if it says otherwise."""
    from anechain.config import ResidencySettings
    from anechain.residency import NO_ANE_REASON, PackagePlan, Program, report_for_plan

    path = Path(path)
    data = read_bundle(path)
    where = f"{path.name}"
    try:
        meta = ShardMetadata.from_user_metadata(data["package"]["metadata"], where)
        settings = from_dict(ValidationSettings, data["validation"], "validation")
        res_settings = from_dict(ResidencySettings, data["residency_settings"], "residency")
        plan = PackagePlan.from_dict(data["plan"], where=f"{where} plan")
        # Every function's program; a bundle of a one-function package may hold `program`.
        recorded = data["programs"] if "programs" in data else [data["program"]]
        programs = [Program.from_dict(p, where=f"{where} program") for p in recorded]
        machine = dict(data["machine"])
        runs = data["runs"]
        inputs = [decode_all(i) for i in data["inputs"]]
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
    _check_compiled_metadata(data.get("compiled_metadata"), where)
    ane = bool(machine.get("neural_engine_cores"))
    residency = report_for_plan(
        plan,
        programs,
        res_settings,
        report_only=not ane,
        plan_source=f"capture:{path.name}",
        reason="" if ane else NO_ANE_REASON,
        where=where,
    )
    claimed = data["residency"]
    _same(claimed.get("status"), residency.status, "residency status", where)
    _same(claimed.get("passed"), residency.passed, "residency passed", where)
    counts = residency.counts.to_dict() if residency.counts else None
    _same(claimed.get("counts"), counts, "residency counts", where)
    per_function = {
        name: {k: v for k, v in f.items() if k in ("counts", "passed")}
        for name, f in (claimed.get("functions") or {}).items()
    }
    recomputed = {
        f.function: {"counts": f.counts.to_dict() if f.counts else None, "passed": f.passed}
        for f in residency.functions
    }
    _same(per_function, recomputed, "per-function residency", where)

    golden = {}
    for units, run in runs.items():
        outputs = [decode_all(o) for o in run["outputs"]]
        states = decode_all(run["states"])
        runner = ReplayRunner(inputs, outputs, states)
        result = golden_run(runner, meta, checkpoint, settings, cache_dir)
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
