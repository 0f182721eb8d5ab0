"""GPU telemetry: silently absent without an NVIDIA GPU (with nvidia-ml-py installed or not), and the
per-step arithmetic of the NVML readings (against a stand-in NVML module)."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

from sdpo_fast.train.telemetry import GPUTelemetry, NvmlReader, _nvml_reader


def test_absent_on_a_cpu_device_with_nvidia_ml_py_installed():
    assert importlib.util.find_spec("pynvml") is not None  # a core dependency
    telemetry = GPUTelemetry(torch.device("cpu"), rank=0)
    telemetry.begin()
    assert telemetry.end() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without an NVIDIA driver")
def test_nvml_without_a_driver_gives_no_reader():
    assert _nvml_reader(torch.device("cuda", 0)) is None  # nvmlInit fails: no error, no reader


def test_nvml_not_installed_gives_no_reader(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert _nvml_reader(torch.device("cuda", 0)) is None


class FakeNVML:
    """The pynvml calls the reader makes; `missing` names queries the 'GPU' does not support."""

    NVML_GPU_UTILIZATION_SAMPLES = 1

    class NVMLError(Exception):
        pass

    def __init__(self, missing: tuple[str, ...] = ()):
        self.missing = missing
        self.energy = iter([1_000, 4_000])  # mJ at begin, at end

    def _call(self, name, value):
        if name in self.missing:
            raise self.NVMLError(name)
        return value

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._call("energy", next(self.energy))

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self._call("memory", SimpleNamespace(used=3_500_000_000))

    def nvmlDeviceGetSamples(self, handle, kind, since):
        assert kind == self.NVML_GPU_UTILIZATION_SAMPLES
        samples = [SimpleNamespace(sampleValue=SimpleNamespace(uiVal=v)) for v in (50, 70, 96)]
        return self._call("samples", (3, samples))

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._call("rates", SimpleNamespace(gpu=42))

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._call("power", 250_000)  # mW


def test_reader_averages_over_the_step():
    clock = iter([10.0, 12.0]).__next__
    reader = NvmlReader(FakeNVML(), handle=object(), clock=clock)
    reader.begin()
    out = reader.end()
    assert out == pytest.approx({"nvml_used_gb": 3.5, "util_pct": 72.0, "power_w": 1.5})  # 3 J over 2 s


def test_reader_falls_back_and_leaves_out_what_the_gpu_cannot_report():
    reader = NvmlReader(FakeNVML(missing=("energy", "samples", "memory")), handle=object(),
                        clock=iter([0.0, 1.0]).__next__)
    reader.begin()
    assert reader.end() == {"util_pct": 42.0, "power_w": 250.0}
    reader = NvmlReader(FakeNVML(missing=("energy", "samples", "memory", "rates", "power")), handle=object())
    reader.begin()
    assert reader.end() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_telemetry_on_a_cuda_device():
    telemetry = GPUTelemetry(torch.device("cuda", 0), rank=3)
    telemetry.begin()
    x = torch.randn(1024, 1024, device="cuda")
    (x @ x).sum().item()
    out = telemetry.end()
    assert out["gpu3/torch_peak_gb"] >= 3 * 4 * 2**20 / 1e9
    if telemetry.reader is not None:
        assert {"gpu3/nvml_used_gb", "gpu3/power_w"} <= set(out)
