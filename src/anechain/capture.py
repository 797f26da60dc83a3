"""Ground truth from a Mac, replayable anywhere: `anechain capture`.

For each package, a bundle (one JSON file, arrays zlib-compressed and base64-encoded) holds
what Core ML did with it on this machine: the compute plan of every function with its
estimated costs, the program of every function (op kinds, names, dtypes), the compiled
model's metadata.json, the inputs of the golden run and Core ML's outputs for them on
CPU_AND_NE and on CPU_ONLY, the states after the run, the residency and golden results as
computed here, and the machine (chip, macOS, coremltools, Neural Engine cores).

`anechain.replay` puts a bundle back through the same residency and golden code.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anechain import __version__
from anechain.checkpoint import Checkpoint
from anechain.config import Config, ValidationSettings, to_dict
from anechain.contract import KIND_HEAD, ShardMetadata
from anechain.errors import AnechainError
from anechain.fsutil import sha256_tree
from anechain.jsonio import atomic_write_json

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


def encode_all(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: encode_array(np.asarray(v)) for k, v in sorted(arrays.items())}


def decode_all(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: decode_array(v) for k, v in d.items()}


# --- recording runner ------------------------------------------------------


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


# --- the golden run (the same code validate uses) -----------------------------------------


def golden_run(
    runner: Any,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None,
) -> dict[str, Any]:
    """Gates and metrics of one golden run, as validate computes them."""
    from anechain.head import run_head_golden
    from anechain.report import evaluate_gates
    from anechain.validate import run_golden

    if meta.kind == KIND_HEAD:
        head = run_head_golden(runner, meta, checkpoint, settings, cache_dir)
        metrics, gates = head["metrics"], evaluate_gates(head["metrics"], settings.gates, KIND_HEAD)
    else:
        # One window: a bundle records the first `steps` and the states they leave.
        one = dataclasses.replace(settings, late_steps=0)
        golden, gates = run_golden(runner, meta, checkpoint, one, cache_dir)
        metrics = golden.metrics
    return {
        "metrics": metrics,
        "gates": {g.name: g.passed for g in gates},
        "passed": all(g.passed for g in gates),
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
        live_reason,
        load_live_plan,
        programs_from_spec,
        refocus_unreported,
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
    programs = programs_from_spec(spec)
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
        # Core ML plans a compiled model's default function only: the others as a copy's.
        plan, replanned = refocus_unreported(
            plan, package, load_plan=seams.load_plan, compiler=seams.compiler
        )
        ane = bool(machine.get("neural_engine_cores"))
        residency = report_for_plan(
            plan,
            programs,
            config.residency,
            report_only=not ane,
            plan_source="live",
            reason=live_reason(ane, replanned),
            where=package.name,
            lenient=True,  # compiled just above; its replay is matched strictly
        )
        runs: dict[str, Any] = {}
        inputs: list[dict[str, Any]] = []
        for units in RUN_UNITS:
            say(f"[{package.name}] golden run on {units}")
            runner = RecordingRunner(
                CoreMLRunner(package, units, compiled=compiled, load_model=seams.load_model)
            )
            golden = golden_run(runner, meta, checkpoint, config.validation, cache_dir)
            if not inputs:
                inputs = [encode_all(i) for i, _ in runner.steps]
            runs[units] = {
                "outputs": [encode_all(o) for _, o in runner.steps],
                "states": encode_all({s: runner.read_state(s) for s in runner.runner.state_names}),
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
        "programs": [p.to_dict() for p in programs],
        "compiled_metadata": compiled_meta,
        "plan": plan.to_dict(),
        "residency": residency.to_dict(),
        "inputs": inputs,
        "runs": runs,
    }
    out = Path(out_dir) / f"{package.stem}.capture.json"
    atomic_write_json(out, bundle, indent=1)  # strict: a NaN metric is null, not an error
    say(f"[{package.name}] wrote {out}")
    return out


def verify_random_recipe(checkpoint: Checkpoint, preset: str, seed: int) -> dict[str, Any]:
    """{'preset', 'seed', 'style'} if `anechain random-checkpoint --preset P --seed S
    --style STYLE` remakes `checkpoint` (same fingerprint); CaptureError otherwise."""
    from anechain.checkpoint import STYLES, write_random_checkpoint
    from anechain.config import load_preset

    with tempfile.TemporaryDirectory(prefix="anechain-recipe-") as tmp:
        for style in STYLES:
            remade = write_random_checkpoint(
                Path(tmp) / style, load_preset(preset).architecture, seed=seed, style=style
            )
            if Checkpoint(remade).fingerprint == checkpoint.fingerprint:
                return {"preset": preset, "seed": seed, "style": style}
    raise CaptureError(f"{checkpoint.path} is not the random {preset} checkpoint of seed {seed}")


def read_bundle(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != CAPTURE_SCHEMA:
        raise CaptureError(f"{path} is not an anechain capture ({CAPTURE_SCHEMA})")
    return data
