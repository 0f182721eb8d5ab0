"""Shared test builders: random inputs of the fused ops, and a two-rank FSDP2 (gloo, CPU) harness."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

from sdpo_fast.distill import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]  # the repository root
IGNORE = IGNORE_INDEX  # the ignore_index the tests pass to the ops


class OpInputs(NamedTuple):
    """Arguments of linear_distill / linear_logprobs: hidden states, LM heads and target token ids."""

    hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    weight: torch.Tensor
    teacher_weight: torch.Tensor | None
    targets: torch.Tensor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> OpInputs:
        """The tensors on `device`; floating ones also cast to `dtype` when given."""
        cast = (lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() else None))
        return OpInputs(*map(cast, self))


def op_inputs(seed: int, *, n: int, h: int, v: int, teacher_h: int | None = None, separate_head: bool = True,
              lead: tuple[int, ...] = (), hidden_scale: float = 1.0, head_scale: float = 1.0,
              offsets: tuple[float, float] | None = None, ignore_every: int | None = None,
              ignore_frac: float = 0.0, dtype: torch.dtype = torch.float64) -> OpInputs:
    """Random inputs of one op call, drawn in float64 from `seed` and cast to `dtype`.

    Hidden states are N(0, hidden_scale^2) of shape [*lead, n, h] (teacher width `teacher_h`, default h);
    heads are N(0, 1) * head_scale / sqrt(width), so logits have about hidden_scale * head_scale spread.
    `offsets` (student, teacher) adds a constant to every logit through hidden unit 0 fixed at 1 (a shared
    head needs equal offsets). Targets include the first and last vocabulary ids; every `ignore_every`-th
    row and a random `ignore_frac` of the rows are IGNORE.
    """
    if not separate_head and (teacher_h not in (None, h) or (offsets and offsets[0] != offsets[1])):
        raise ValueError("a shared head needs teacher_h == h and one offset")
    gen = torch.Generator().manual_seed(seed)
    teacher_h = h if teacher_h is None else teacher_h

    def hidden(width: int) -> torch.Tensor:
        x = torch.randn(*lead, n, width, generator=gen, dtype=torch.float64) * hidden_scale
        if offsets is not None:
            x[..., 0] = 1.0
        return x

    def head(width: int, offset: float) -> torch.Tensor:
        w = torch.randn(v, width, generator=gen, dtype=torch.float64) * head_scale / math.sqrt(width)
        if offsets is not None:
            w[:, 0] = offset
        return w

    off_s, off_t = offsets or (0.0, 0.0)
    hs, ht = hidden(h), hidden(teacher_h)
    weight = head(h, off_s)
    teacher_weight = head(teacher_h, off_t) if separate_head else None
    targets = torch.randint(0, v, (*lead, n), generator=gen)
    targets[..., 0], targets[..., min(1, n - 1)] = v - 1, 0  # the first and last vocabulary columns
    if ignore_every:
        targets[..., ::ignore_every] = IGNORE
    if ignore_frac:
        targets[torch.rand(targets.shape, generator=gen) < ignore_frac] = IGNORE
    return OpInputs(hs, ht, weight, teacher_weight, targets).to("cpu", dtype)


FORK_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs the fork start method (Linux)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    """One rank: single-threaded torch, a gloo process group and a CPU device mesh over all ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, init_device_mesh("cpu", (world,)), *args)
    finally:
        dist.destroy_process_group()


def run_two_ranks(worker: Callable[..., None], *args: object, timeout_s: int = 120) -> None:
    """Runs worker(rank, mesh, *args) on two forked gloo ranks (an exception in either fails the test), or
    skips without torch.distributed's gloo backend. fork keeps start-up to seconds (spawn re-imports torch
    in every rank); callers mark themselves `FORK_ONLY`.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    ctx = mp.start_processes(_rank_main, args=(2, free_port(), worker, args), nprocs=2, join=False,
                             start_method="fork")
    for _ in range(timeout_s):
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail(f"FSDP2 workers did not finish within {timeout_s} s")
