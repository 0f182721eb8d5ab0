"""Per-step GPU telemetry for the metrics stream: peak memory, utilisation and power of this rank's GPU.

`GPUTelemetry(device, rank)` brackets a training step with `begin()` / `end()`; `end()` returns

    gpu{rank}/torch_peak_gb   torch.cuda.max_memory_allocated during the step (this process's tensors)
    gpu{rank}/nvml_used_gb    device memory in use at the end of the step (every process, vLLM's pool too)
    gpu{rank}/util_pct        mean GPU utilisation over the step (NVML samples; the last NVML period if none)
    gpu{rank}/power_w         mean board power over the step (energy counter delta / time; instantaneous
                              power where the GPU has no energy counter)

read through nvidia-ml-py (`pynvml`). On a machine without the package, without an NVIDIA driver, or
with a non-CUDA device, `end()` returns {}: telemetry is silently absent, never an error. A query the GPU
does not support (e.g. utilisation of a MIG slice) leaves its key out.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)
GB = 1e9


class NvmlReader:
    """Step-bracketed NVML readings of one device handle (`nvml` is the pynvml module or a stand-in)."""

    def __init__(self, nvml: Any, handle: Any, clock: Callable[[], float] = time.monotonic):
        self.nvml, self.handle, self.clock = nvml, handle, clock
        self._t0 = 0.0
        self._energy0: int | None = None
        self._sample_ts = 0

    def begin(self) -> None:
        self._t0 = self.clock()
        self._energy0 = self._query(self.nvml.nvmlDeviceGetTotalEnergyConsumption)  # mJ since driver load
        self._sample_ts = int(time.time() * 1e6)  # NVML sample timestamps are wall-clock microseconds

    def end(self) -> dict[str, float]:
        out: dict[str, float] = {}
        memory = self._query(self.nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            out["nvml_used_gb"] = memory.used / GB
        util = self._mean_utilisation()
        if util is not None:
            out["util_pct"] = util
        elapsed = self.clock() - self._t0
        energy = self._query(self.nvml.nvmlDeviceGetTotalEnergyConsumption)
        if energy is not None and self._energy0 is not None and elapsed > 0:
            out["power_w"] = (energy - self._energy0) / 1e3 / elapsed
        else:
            milliwatts = self._query(self.nvml.nvmlDeviceGetPowerUsage)
            if milliwatts is not None:
                out["power_w"] = milliwatts / 1e3
        return out

    def _mean_utilisation(self) -> float | None:
        samples = self._query(self.nvml.nvmlDeviceGetSamples, self.nvml.NVML_GPU_UTILIZATION_SAMPLES,
                              self._sample_ts)
        if samples:  # (value type, samples taken since the step began)
            values = [s.sampleValue.uiVal for s in samples[1]]
            if values:
                return float(sum(values)) / len(values)
        rates = self._query(self.nvml.nvmlDeviceGetUtilizationRates)
        return float(rates.gpu) if rates is not None else None

    def _query(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:
            return None


class GPUTelemetry:
    """Telemetry of the CUDA device `device` for rank `rank` (see the module docstring)."""

    def __init__(self, device: torch.device, rank: int = 0):
        self.device = torch.device(device)
        self.prefix = f"gpu{rank}/"
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.reader = _nvml_reader(self.device) if self.cuda else None

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.reader is not None:
            self.reader.begin()

    def end(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        out = {"torch_peak_gb": torch.cuda.max_memory_allocated(self.device) / GB}
        if self.reader is not None:
            out.update(self.reader.end())
        return {self.prefix + k: v for k, v in out.items()}


def _nvml_reader(device: torch.device) -> NvmlReader | None:
    """An NvmlReader for the CUDA device, matched to its NVML handle by PCI address; None without NVML."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError when the driver library is missing
        log.info("GPU telemetry from NVML unavailable: %s", exc)
        return None
    props = torch.cuda.get_device_properties(device)
    want = (getattr(props, "pci_domain_id", 0), getattr(props, "pci_bus_id", None),
            getattr(props, "pci_device_id", None))
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            pci = nvml.nvmlDeviceGetPciInfo(handle)
            if (pci.domain, pci.bus, pci.device) == want:
                return NvmlReader(nvml, handle)
    except nvml.NVMLError as exc:
        log.info("GPU telemetry from NVML unavailable: %s", exc)
        return None
    log.info("GPU telemetry: no NVML device at the PCI address of %s", device)
    return None
