"""Measurements of the fused op `linear_distill`: one forward + backward per call, per implementation.

One case (`make_inputs` + `make_step`), measured two ways:

- `measure` (any device, in this process): median time of a forward + backward with random upstream
  gradients on divergence and student_logp, TFLOP/s (12 N H V per step: forward logits of both streams 4NHV,
  their recompute in backward 4NHV, the two gradient GEMMs 4NHV) against a torch.mm measured in the same
  run, and on CUDA the peak memory beyond the inputs and d(weight). impl "liger" times Liger-Kernel's
  LigerFusedLinearJSD (jsd_beta = alpha) when it is installed.
- `measure_isolated` (CPU): the same in a fresh child process (`memory.in_child`), so that its peak RSS
  beyond the inputs (d(weight) included) is the op's memory.

chunk_elems (impl "chunked" only): elements of one [C, V] working block; None keeps the op's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdpo_fast.bench.common import median_times
from sdpo_fast.bench.memory import PeakMemory, in_child
from sdpo_fast.distill import IGNORE_INDEX as IGNORE


@dataclass
class OpRow:
    """One measured (impl, N, alpha); ms None and `error` set when it did not run."""

    impl: str
    n: int
    alpha: float
    ms: float | None = None
    tflops: float | None = None
    pct_matmul: float | None = None
    extra_mb: float | None = None  # peak beyond inputs (and on CUDA d(weight)); None where not measured
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


def make_step(impl: str, x: dict, alpha: float, chunk_elems: int | None = None) -> Callable[[], list | None]:
    """One forward + backward of `impl` on the inputs `x` (gradients reset first); the step returns
    [divergence, student log-probs, d(hs), d(w)] (None for liger, whose loss is a scalar)."""
    if chunk_elems is not None and impl != "chunked":
        raise ValueError(f"chunk_elems applies to impl 'chunked' only, got impl {impl!r}")
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=alpha, ignore_index=IGNORE, temperature=1.0)

        def step() -> None:
            x["hs"].grad = x["w"].grad = None
            loss_fn(x["hs"], x["w"], x["ht"], x["wt"], x["targets"]).backward()

        return step

    if chunk_elems is None:
        from sdpo_fast import linear_distill

        def forward():
            return linear_distill(x["hs"], x["ht"], x["w"], x["targets"], teacher_weight=x["wt"], alpha=alpha,
                                  ignore_index=IGNORE, impl=impl)
    else:  # the chunked implementation itself: the public op keeps its block size
        from sdpo_fast.distill.chunked import linear_distill_chunked

        def forward():
            return linear_distill_chunked(x["hs"], x["ht"], x["w"], x["wt"], x["targets"], alpha=alpha,
                                          temperature=1.0, topk=None, add_tail=True, ignore_index=IGNORE,
                                          chunk_elems=chunk_elems)

    def step() -> list:
        x["hs"].grad = x["w"].grad = None
        out = forward()
        ((out.divergence * x["g_div"]).sum() + (out.student_logp * x["g_logp"]).sum()).backward()
        return [out.divergence, out.student_logp, x["hs"].grad, x["w"].grad]

    return step


def matmul_tflops(device: str, dtype: torch.dtype, size: int, warmup: int, repeats: int,
                  shape: tuple[int, int, int] | None = None) -> float:
    """Measured rate of torch.mm in `dtype` (the reference for "% mm"): square `size`, or [m, k] x [k, n]
    for `shape` (m, k, n)."""
    m, k, n = shape or (size,) * 3
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    (seconds,) = median_times([lambda: torch.mm(a, b)], warmup, repeats, device=device)
    return 2 * m * k * n / seconds / 1e12


def _case(impl: str, n: int, alpha: float, hidden: int, vocab: int, dtype: torch.dtype, device: str,
          warmup: int, repeats: int, chunk_elems: int | None) -> dict:
    """{"ms", "extra_mb"} of one forward + backward; memory beyond the inputs, d(weight) excluded on CUDA."""
    if torch.device(device).type == "cpu":  # BLAS/thread-pool start-up is not the op's memory
        make_step(impl, make_inputs(8, hidden, 64, dtype, device), alpha, chunk_elems)()
    x = make_inputs(n, hidden, vocab, dtype, device)
    step = make_step(impl, x, alpha, chunk_elems)
    memory = PeakMemory(device)
    (seconds,) = median_times([step], warmup, repeats, device=device)
    extra = memory.extra_bytes()
    if memory.cuda:
        extra -= x["w"].numel() * x["w"].element_size()
    return {"ms": 1e3 * seconds, "extra_mb": extra / 2**20}


def _row(impl: str, n: int, alpha: float, hidden: int, vocab: int, mm_rate: float | None, got: dict) -> OpRow:
    row = OpRow(impl, n, alpha, ms=got.get("ms"), extra_mb=got.get("extra_mb"), error=got.get("error"))
    if row.ms:
        row.tflops = 12 * n * hidden * vocab / (row.ms * 1e-3) / 1e12
        if mm_rate:
            row.pct_matmul = 100 * row.tflops / mm_rate
    return row


def measure(impl: str, n: int, alpha: float, *, hidden: int, vocab: int, dtype: torch.dtype, device: str,
            warmup: int, repeats: int, mm_rate: float | None = None, chunk_elems: int | None = None) -> OpRow:
    """Time (and on CUDA, memory) of one forward + backward of `impl` in this process; errors become the
    row's `error`. mm_rate: TFLOP/s of the reference torch.mm (None: no "% mm")."""
    cuda = torch.device(device).type == "cuda"
    try:
        got = _case(impl, n, alpha, hidden, vocab, dtype, device, warmup, repeats, chunk_elems)
        if not cuda:
            got["extra_mb"] = None  # this process's RSS holds earlier cases: see measure_isolated
    except torch.OutOfMemoryError:
        got = {"error": "out of memory"}
    except (ImportError, AssertionError, ValueError, RuntimeError) as exc:  # not installed / unsupported
        got = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return _row(impl, n, alpha, hidden, vocab, mm_rate, got)


def _isolated_case(threads: int, *args) -> dict:
    torch.set_num_threads(threads)
    return _case(*args)


def measure_isolated(impl: str, n: int, alpha: float, *, hidden: int, vocab: int, warmup: int, repeats: int,
                     mm_rate: float | None = None, chunk_elems: int | None = None,
                     mem_limit_gb: float = 20.0) -> OpRow:
    """CPU fp32 `measure` in a fresh child process (as many torch threads as this one) under an address-space
    limit of `mem_limit_gb`, with its peak RSS beyond the inputs as extra_mb (d(weight) included, which every
    implementation produces)."""
    got = in_child(_isolated_case, torch.get_num_threads(), impl, n, alpha, hidden, vocab, torch.float32, "cpu",
                   warmup, repeats, chunk_elems, mem_limit_gb=mem_limit_gb)
    return _row(impl, n, alpha, hidden, vocab, mm_rate, got)
