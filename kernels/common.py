"""Pieces shared by the linear-distill kernels: logit tiles, the log-mixture, configs, program order, launch sizes."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Read once, when the kernels are decorated: `triton.jit` builds interpreter functions exactly when
# TRITON_INTERPRET=1 was set at import time, so this flag says how the kernels in this package run.
try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs and reads the variable directly
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# SDPO_FAST_AUTOTUNE=1 (read at import) benchmarks every config of a kernel's list on first use (per
# shape key and dtype, cached on disk across processes); otherwise each dtype runs its fixed default
# config, the same on every rank and without any tuning run.
AUTOTUNE: bool = os.environ.get("SDPO_FAST_AUTOTUNE", "0") == "1"

# Running maxima start here instead of -inf: finite, so rescaling an empty state gives exp(-huge) * 0 = 0
# instead of inf * 0 = nan, and far below any logit a model can produce.
EMPTY_MAX: tl.constexpr = tl.constexpr(-1.0e30)

# Row tiles per group in the grouped program order of tile grids (see `grouped_tile`).
GROUP_ROWS: tl.constexpr = tl.constexpr(8)


class TileConfig(NamedTuple):
    """One launch configuration: tile sizes (rows, columns, reduction slice), warps, pipeline stages."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


class KernelConfigs(NamedTuple):
    """The configs a kernel may run with, per input kind and GPU generation; the first of each list is its default.

    `half` serves fp16/bf16 inputs (tensor cores, bf16/fp16 operands), `fp32` serves fp32 inputs
    (3xTF32 products, which keep fp32-level accuracy and need more registers and shared memory).
    `half_sm80`, when given, replaces `half` on GPUs older than Hopper (compute capability below 9.0),
    where ptxas spills some 16-bit tiles that it compiles without spills for Hopper.
    """

    half: list[TileConfig]
    fp32: list[TileConfig]
    half_sm80: list[TileConfig] | None = None

    def for_target(self, dtype: torch.dtype, capability: int) -> list[TileConfig]:
        """The list for `dtype` inputs on a GPU of compute capability `capability` (major * 10 + minor)."""
        if dtype == torch.float32:
            return self.fp32
        return self.half_sm80 if capability < 90 and self.half_sm80 is not None else self.half

    def pickable(self, dtype: torch.dtype, capability: int) -> list[TileConfig]:
        """The configs a launch can run: the whole list for (dtype, capability) when tuning, else its default."""
        configs = self.for_target(dtype, capability)
        return configs if AUTOTUNE else configs[:1]

    def all(self) -> list[TileConfig]:
        """Every config of every list, once each (what the autotuner is given before pruning)."""
        return list(dict.fromkeys(self.half + self.fp32 + (self.half_sm80 or [])))


def device_capability(device: torch.device) -> int:
    """Compute capability of `device` as major * 10 + minor (90 for H100, 80 for A100); 90 off-GPU,
    where no kernel is compiled and only the config choice is exercised."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# Under the interpreter autotuning with more than one config fails, so one small config is used there
# (small enough that the tests' shapes span several row, vocabulary and hidden tiles).
_INTERPRETER_CONFIG = TileConfig(64, 256, 64, 4, 1)


def autotune(configs: KernelConfigs, key: list[str], dtype_arg: str):
    """`triton.autotune` over `configs`, pruned per launch by `dtype_prune`. Tuning results are cached
    on disk (Triton's autotune cache), so later processes reuse them."""
    listed = [_INTERPRETER_CONFIG] if INTERPRET else configs.all()
    return triton.autotune(
        configs=[triton.Config({"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h},
                               num_warps=c.num_warps, num_stages=c.num_stages) for c in listed],
        key=key, prune_configs_by={"early_config_prune": dtype_prune(configs, dtype_arg)}, cache_results=True,
    )


def dtype_prune(configs: KernelConfigs, dtype_arg: str):
    """Autotuner pruning: keep the configs pickable for the dtype and device of argument `dtype_arg` (its
    whole list with SDPO_FAST_AUTOTUNE=1, else its default alone, so nothing is benchmarked)."""

    def prune(candidates: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if INTERPRET:  # the interpreter's single config
            return candidates
        tensor = {**named_args, **kwargs}[dtype_arg]  # launchers pass every argument by keyword
        wanted = set(configs.pickable(tensor.dtype, device_capability(tensor.device)))
        return [c for c in candidates if _tile(c) in wanted]

    return prune


class Launch(NamedTuple):
    """A kernel launch as the launcher builds it: kernel, grid (a callable of the config) and arguments.

    `sdpo_fast.kernels.resources` compiles the very same launches for GPU targets without running them.
    """

    kernel: object
    grid: object
    args: dict

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args)


def _tile(config: triton.Config) -> TileConfig:
    kw = config.kwargs
    return TileConfig(kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_H"], config.num_warps, config.num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: 3xTF32 for fp32 inputs (about fp32 accuracy on tensor cores), else the
    inputs' own 16-bit type ("tf32" only names the default; fp16/bf16 operands are used as they are)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def device_programs(device: torch.device) -> int:
    """Programs that keep every SM of `device` busy (two per SM); a small fixed number off-GPU."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def grouped_tile(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: consecutive programs sweep the columns
    of a group of GROUP row tiles column by column, so the programs resident at once share a few row
    tiles and a few column tiles (both stay in L2) instead of all row tiles at one column."""
    per_group = GROUP * n_col_tiles
    first_row = (pid // per_group) * GROUP
    rows_here = tl.minimum(n_row_tiles - first_row, GROUP)
    within = pid % per_group
    return first_row + within % rows_here, within // rows_here


@triton.jit
def logit_tile(h_ptr, stride_h, rows, row_ok, w_ptr, stride_w, cols, col_ok, K, scale,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of (h[rows] @ w[cols]^T) * scale, reducing over K hidden units.

    `rows` (int64) and `cols` index rows of h and w, whose last dimension is contiguous. Masked rows and
    columns read zeros (and no memory), so their logits are 0 (callers mask them out). K = 0 skips the
    products: the tile is all zeros.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, K, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < K
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def row_validity(tgt_ptr, offs, n_rows, ignore_index):
    """(in range, in range and not ignored, targets) of rows `offs`; ignored rows read as -1 targets."""
    in_range = offs < n_rows
    tgt = tl.load(tgt_ptr + offs, mask=in_range, other=ignore_index)
    valid = in_range & (tgt != ignore_index)
    return in_range, valid, tl.where(valid, tgt, -1)


@triton.jit
def log_mixture(logp, logq, log_1m_alpha, log_alpha):
    """log((1 - alpha) p + alpha q) from log p and log q, stable for any magnitudes (0 < alpha < 1)."""
    x = logp + log_1m_alpha
    y = logq + log_alpha
    hi = tl.maximum(x, y)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))
