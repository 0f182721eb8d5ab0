"""Helpers every benchmark shares: interleaved median timing, the machine's description, git commit."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def median_times(fns: Sequence[Callable[[], object]], warmup: int = 1, repeats: int = 5,
                 device: str | torch.device = "cpu") -> list[float]:
    """Median seconds of each function, called in turn (so machine noise hits all alike) after `warmup` rounds.

    device: where the functions run; on CUDA the clock is read after a synchronize, so asynchronous work counts.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(warmup + repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            if rep >= warmup:
                bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """Short hash of the checkout's HEAD ('unknown' outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
