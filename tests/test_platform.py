"""What the machine can do, asked of Core ML: the Neural Engine probe behind the `ane` marker
and the live residency gate (devices are coremltools' own classes over stand-in proxies)."""

from __future__ import annotations

import sys

import pytest
from coremltools.models.compute_device import MLNeuralEngineComputeDevice
from tests.fakes.coreml import FakeCPU, FakeGPU

from anechain import platform
from anechain.errors import PlatformError


class _EngineProxy:
    def __init__(self, cores: int) -> None:
        self.cores = cores

    def get_total_core_count(self) -> int:
        return self.cores


def engine(cores: int) -> MLNeuralEngineComputeDevice:
    device = object.__new__(MLNeuralEngineComputeDevice)  # __init__ insists on the native type
    device.__proxy__ = _EngineProxy(cores)
    return device


def test_the_neural_engine_is_what_core_ml_lists():
    assert platform.neural_engine_cores([FakeCPU(), FakeGPU()]) == 0  # a hosted macOS VM
    assert platform.neural_engine_cores([FakeCPU(), FakeGPU(), engine(16)]) == 16
    assert platform.neural_engine_cores([FakeCPU(), engine(0)]) == 0


def test_the_probe_asks_core_ml_only_on_a_recent_macos(monkeypatch):
    asked = []
    monkeypatch.setattr(platform, "_all_compute_devices", lambda: asked.append(1) or [engine(8)])
    monkeypatch.setattr(platform, "macos_version", lambda: (13, 6))
    assert platform.neural_engine_cores() == 0 and asked == []
    monkeypatch.setattr(platform, "macos_version", lambda: (15, 1))
    assert platform.neural_engine_cores() == 8 and asked == [1]

    def broken() -> list:
        raise RuntimeError("no native proxy")

    monkeypatch.setattr(platform, "_all_compute_devices", broken)
    assert platform.neural_engine_cores() == 0


@pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")
def test_off_macos_there_is_no_neural_engine_and_no_core_ml():
    assert platform.has_neural_engine() is False
    assert not platform.macos_at_least((14,))
    with pytest.raises(PlatformError, match="needs macOS 15\\+ with Core ML"):
        platform.require_macos("x")
    info = platform.machine_info()
    assert info["neural_engine_cores"] == 0 and info["macos"] is None
    assert set(info) == {"system", "machine", "chip", "macos", "coremltools", "neural_engine_cores"}


@pytest.mark.ane
def test_the_ane_marker_sees_what_core_ml_sees():
    assert platform.has_neural_engine() and platform.machine_info()["neural_engine_cores"] > 0


@pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")
def test_mac_check_off_macos_is_one_line_before_installing_anything(tmp_path):
    """`make mac-check` (scripts/mac_check.sh) says it needs macOS 15+ and stops, before it
    makes a venv (VENV points at a folder that must stay absent)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "mac_check.sh"
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "VENV": str(venv)},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: make mac-check needs macOS 15+ with Core ML; this machine runs {sys.platform}\n"
    )
    assert not venv.exists()
