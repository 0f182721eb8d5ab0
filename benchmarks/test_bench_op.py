"""pytest-benchmark: `linear_distill` forward + backward per implementation (the op section of
`sdpo-fast bench`). Run with `pytest benchmarks --benchmark-only`; compare runs with --benchmark-compare."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.bench.op import make_inputs, make_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Tiny on CPU (seconds); LLM-like on a GPU, where the Triton kernel joins.
SHAPE = dict(n=4096, hidden=2048, vocab=65536) if CUDA else dict(n=256, hidden=128, vocab=8191)
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = ["naive", "chunked", "triton"] if CUDA else ["naive", "chunked"]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_distill_fwd_bwd(benchmark, impl, alpha):
    benchmark.group = f"linear_distill N={SHAPE['n']} H={SHAPE['hidden']} V={SHAPE['vocab']} alpha={alpha}"
    step = make_step(impl, make_inputs(SHAPE["n"], SHAPE["hidden"], SHAPE["vocab"], DTYPE, DEVICE), alpha)

    def run() -> None:
        step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
