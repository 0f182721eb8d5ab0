"""pytest-benchmark: `linear_distill` forward + backward per implementation (the op case of `sdpo-fast bench`),
timed, with the memory bound that is the point of the fused paths: each stays under half the naive path's
peak memory beyond the inputs, and the naive path holds at least the [N, V] logits.

Run with `pytest benchmarks --benchmark-only`; compare runs with --benchmark-compare.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sdpo_fast.bench.op import make_inputs, make_step, measure, measure_isolated

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Seconds on CPU; LLM-like on a GPU, where the Triton kernel joins.
SHAPE = dict(n=4096, hidden=2048, vocab=65536) if CUDA else dict(n=1024, hidden=128, vocab=8191)
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = ["naive", "chunked", "triton"] if CUDA else ["naive", "chunked"]
# CPU: blocks of 32 rows, so that the small shape has several (the default block holds all its logits).
CHUNK = {"chunked": None if CUDA else 32 * SHAPE["vocab"]}


@functools.cache
def extra_mb(impl: str, alpha: float) -> float:
    """Peak memory beyond the inputs of one forward + backward: CUDA memory (d(weight) excluded) on a GPU,
    a child process's RSS (d(weight) included) on CPU."""
    kw = dict(**SHAPE, warmup=1, repeats=1, chunk_elems=CHUNK.get(impl))
    if CUDA:
        row = measure(impl, alpha=alpha, dtype=DTYPE, device=DEVICE, **kw)
    else:
        row = measure_isolated(impl, alpha=alpha, **kw)
    assert row.error is None, f"{impl}: {row.error}"
    return row.extra_mb


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_distill_fwd_bwd(benchmark, impl, alpha):
    benchmark.group = f"linear_distill N={SHAPE['n']} H={SHAPE['hidden']} V={SHAPE['vocab']} alpha={alpha}"
    x = make_inputs(SHAPE["n"], SHAPE["hidden"], SHAPE["vocab"], DTYPE, DEVICE)
    step = make_step(impl, x, alpha, CHUNK.get(impl))

    def run() -> None:
        step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=1, rounds=5)

    mine, naive = extra_mb(impl, alpha), extra_mb("naive", alpha)
    benchmark.extra_info.update(extra_mb=mine, memory_vs_naive=mine / naive)
    logits_mb = SHAPE["n"] * SHAPE["vocab"] * x["w"].element_size() / 2**20
    if impl == "naive":
        assert mine >= logits_mb
    else:
        assert mine < 0.5 * naive, f"{impl} used {mine:.0f} MB beyond the inputs, naive {naive:.0f} MB"
