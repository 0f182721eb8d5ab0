"""Measurements of the fused op `linear_distill`: one forward + backward per call, per implementation.

- `measure` (any device, in-process): median time of a forward + backward with random upstream gradients
  on divergence and student_logp, TFLOP/s (12 N H V per step: forward logits of both streams 4NHV, their
  recompute in backward 4NHV, the two gradient GEMMs 4NHV) against a bf16/fp32 torch.mm measured in the same
  run, and on CUDA the peak memory beyond the inputs and d(weight). impl "liger" times Liger-Kernel's
  LigerFusedLinearJSD (jsd_beta = alpha) when it is installed.
- `measure_isolated` (CPU): the same step in a fresh child process, so that its peak RSS beyond the inputs
  can be read; the child runs under an address-space limit, so an implementation that does not fit
  reports "out of memory" instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

IGNORE = -100


@dataclass
class OpRow:
    """One measured (impl, N, alpha); ms None and `error` set when it did not run."""

    impl: str
    n: int
    alpha: float
    ms: float | None = None
    tflops: float | None = None
    pct_matmul: float | None = None
    extra_mb: float | None = None  # peak beyond inputs and d(weight); None where not measured
    error: str | None = None


def make_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Student/teacher hidden states and heads of LLM-like scale, 5% ignored rows, upstream gradients."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.05] = IGNORE
    return dict(
        hs=randn(n, hidden).requires_grad_(True), ht=randn(n, hidden),
        w=randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True), wt=randn(vocab, hidden, scale=hidden**-0.5),
        targets=targets, g_div=torch.rand(n, generator=gen, device=device),
        g_logp=torch.randn(n, generator=gen, device=device),
    )


def make_step(impl: str, x: dict, alpha: float) -> Callable[[], None]:
    """One forward + backward of `impl` on the inputs `x` (gradients reset first)."""
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=alpha, ignore_index=IGNORE, temperature=1.0)

        def step() -> None:
            x["hs"].grad = x["w"].grad = None
            loss_fn(x["hs"], x["w"], x["ht"], x["wt"], x["targets"]).backward()

        return step

    from sdpo_fast import linear_distill

    def step() -> None:
        x["hs"].grad = x["w"].grad = None
        out = linear_distill(x["hs"], x["ht"], x["w"], x["targets"], teacher_weight=x["wt"], alpha=alpha,
                             ignore_index=IGNORE, impl=impl)
        ((out.divergence * x["g_div"]).sum() + (out.student_logp * x["g_logp"]).sum()).backward()

    return step


def median_ms(fn: Callable[[], None], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in ms after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def extra_memory_mb(fn: Callable[[], None], x: dict) -> float:
    """Peak CUDA memory of one `fn` call beyond what was allocated before it (the inputs) and d(weight)."""
    x["hs"].grad = x["w"].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    grad_w = x["w"].numel() * x["w"].element_size()
    return (torch.cuda.max_memory_allocated() - base - grad_w) / 2**20


def matmul_tflops(device: str, dtype: torch.dtype, size: int, warmup: int, repeats: int) -> float:
    """Measured rate of a square torch.mm in `dtype` (the reference for "% mm")."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, warmup, repeats)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def measure(impl: str, n: int, alpha: float, *, hidden: int, vocab: int, dtype: torch.dtype, device: str,
            warmup: int, repeats: int, mm_rate: float) -> OpRow:
    """Time (and on CUDA, memory) of one forward + backward of `impl`; errors become the row's `error`."""
    row = OpRow(impl, n, alpha)
    x = None
    try:
        x = make_inputs(n, hidden, vocab, dtype, device)
        step = make_step(impl, x, alpha)
        row.ms = median_ms(step, device, warmup, repeats)
        row.tflops = 12 * n * hidden * vocab / (row.ms * 1e-3) / 1e12
        row.pct_matmul = 100 * row.tflops / mm_rate
        if device == "cuda":
            row.extra_mb = extra_memory_mb(step, x)
    except torch.OutOfMemoryError:
        row.error = "out of memory"
    except (ImportError, AssertionError, ValueError, RuntimeError) as exc:  # not installed / unsupported
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _child(impl: str, n: int, hidden: int, vocab: int, alpha: float, repeats: int, mem_limit: int,
           chunk_elems: int | None, queue) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    try:
        import sdpo_fast.distill.chunked as chunked
        from sdpo_fast import linear_distill

        if chunk_elems:
            chunked.DEFAULT_CHUNK_ELEMS = chunk_elems

        torch.manual_seed(0)
        hs = torch.randn(n, hidden) / hidden**0.25
        ht = torch.randn(n, hidden) / hidden**0.25
        w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(True)
        wt = torch.randn(vocab, hidden) / hidden**0.5
        y = torch.randint(0, vocab, (n,))
        g_div, g_logp = torch.rand(n), torch.randn(n)
        _touch_libraries(linear_distill, impl, hidden)  # BLAS/thread-pool start-up is not the op's memory
        base_rss = _rss_bytes()
        times = []
        for _ in range(repeats + 1):  # the first run is warm-up
            h = hs.clone().requires_grad_(True)
            w.grad = None
            start = time.perf_counter()
            out = linear_distill(h, ht, w, y, teacher_weight=wt, alpha=alpha, impl=impl)
            ((out.divergence * g_div).sum() + (out.student_logp * g_logp).sum()).backward()
            times.append(time.perf_counter() - start)
            del out, h
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put({"ms": 1e3 * statistics.median(times[1:]), "extra_mb": (peak - base_rss) / 2**20})
    except (MemoryError, RuntimeError) as exc:
        queue.put({"error": "out of memory" if "alloc" in str(exc).lower() or isinstance(exc, MemoryError)
                   else str(exc)[:200]})


def _touch_libraries(linear_distill, impl: str, hidden: int) -> None:
    h = torch.randn(8, hidden, requires_grad=True)
    w = torch.randn(64, hidden, requires_grad=True)
    out = linear_distill(h, h.detach(), w, torch.zeros(8, dtype=torch.long), impl=impl)
    (out.divergence.sum() + out.student_logp.sum()).backward()


def measure_isolated(impl: str, n: int, *, hidden: int, vocab: int, alpha: float, repeats: int,
                     mem_limit_gb: float = 20.0, chunk_elems: int | None = None) -> dict:
    """CPU fp32 forward + backward of `impl` in a fresh process: {"ms", "extra_mb"} or {"error"}.

    extra_mb is the child's peak RSS minus its RSS once the inputs exist (it includes d(weight), which
    every implementation must produce).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(impl, n, hidden, vocab, alpha, repeats, int(mem_limit_gb * 2**30),
                                            chunk_elems, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}
