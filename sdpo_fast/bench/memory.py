"""Peak memory of a measurement: the CUDA allocator's peak on a GPU, the process's peak RSS on CPU.

A CPU measurement runs in a fresh child (`in_child`), so that no memory freed by earlier work but kept by the
allocator hides part of its peak. The child runs under an address-space limit, so a case that does not
fit reports "out of memory" instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Callable

import torch


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Largest resident memory of this process since it started or since `reset_peak_rss` (VmHWM).

    Not ru_maxrss: Linux carries that across fork and exec, so a spawned child starts with its parent's
    peak, and a child of a large parent would report the parent's memory as its own.
    """
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def reset_peak_rss() -> None:
    """Set this process's peak resident memory to its current resident memory (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory beyond what is in use when it is created (the inputs): `extra_bytes()` after the work.

    CUDA: max_memory_allocated since creation minus memory_allocated at creation. CPU: peak RSS since creation
    minus RSS at creation; memory that earlier work freed but the allocator kept resident is reused without
    showing, so measure in a fresh process (`in_child`).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
            self.base = rss_bytes()

    def extra_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return peak_rss_bytes() - self.base


def _run(target: Callable[..., dict], args: tuple, mem_limit: int | None, queue) -> None:
    if mem_limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    try:
        queue.put(target(*args))
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        oom = isinstance(exc, MemoryError) or "alloc" in text.lower() or "out of memory" in text.lower()
        queue.put({"error": "out of memory" if oom else f"{type(exc).__name__}: {text[:200]}"})
    except Exception as exc:  # not installed / unsupported: the row says why
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"})


def in_child(target: Callable[..., dict], *args, mem_limit_gb: float | None = 20.0) -> dict:
    """`target(*args)` (a module-level function returning a dict) in a fresh process: its dict, or {"error"}.

    mem_limit_gb: the child's address-space limit (None: none).
    """
    if mem_limit_gb is not None and mem_limit_gb <= 0:
        raise ValueError(f"mem_limit_gb must be > 0, got {mem_limit_gb}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    limit = None if mem_limit_gb is None else int(mem_limit_gb * 2**30)
    proc = ctx.Process(target=_run, args=(target, args, limit, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}
