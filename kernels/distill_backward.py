"""Backward of linear_distill: gradient w.r.t. student logits in vocabulary chunks, then GEMMs.

For one vocabulary chunk [v0, v1) at a time, a Triton kernel recomputes the student (and, when the
divergence has an upstream gradient, the teacher) logit tiles of every row and writes
G = d(loss)/d(logits) into a bounded workspace [N, chunk] in the weight's dtype (zero rows for
ignored targets):

    G = (1/T) * ( g_div * dD/dlogits + g_logp * (onehot(y) - p) ),  with dD/dlogits =
        p - q                                  (alpha = 0, forward KL)
        p (log p - log q - KL(p||q))           (alpha = 1, reverse KL)
        (1 - alpha) p (log p - log M - KL(p||M))  (generalized JSD)

Then cuBLAS does d(weight)[v0:v1] = G^T h_s in one GEMM over all rows (fp32 accumulation inside the
GEMM, written once: no [V, H] fp32 buffer), and a second Triton kernel adds G W[v0:v1] into an fp32
d(h_s) buffer (fp32 accumulation across all chunks, no rounded partial products, no temporary).
Chunking over the vocabulary rather than the tokens is what lets d(weight) be written exactly once.
Both Triton kernels run their tiles in grouped order (`grouped_tile`) so that resident programs share
row and column tiles in L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sdpo_fast.kernels.common import (
    GROUP_ROWS,
    KernelConfigs,
    Launch,
    TileConfig,
    autotune,
    dot_precision,
    grouped_tile,
    log_mixture,
    logit_tile,
    row_validity,
)

# Workspace budget for G: 256 MiB is 8192 bf16 columns at 16384 rows; at least one column tile per chunk.
DEFAULT_WORKSPACE_BYTES = 256 << 20
_CHUNK_ALIGN = 128

# Configs of the G kernel (defaults first). With the teacher tile, two fp32 tiles are live; 128 x 128
# tiles spill on sm_80. fp32 inputs (3xTF32) take smaller tiles. Every entry compiles without spills on
# sm_90 and sm_80 (`python -m sdpo_fast.kernels.resources`; 32 x 64 x 32 fp32 tiles spill on sm_80).
GRAD_LOGITS_CONFIGS = KernelConfigs(
    half=[TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 8, 3)],
    fp32=[TileConfig(64, 64, 16, 4, 2), TileConfig(64, 32, 32, 4, 2)],
)
# Configs of the d(h_s) kernel: BLOCK_N rows x BLOCK_V hidden units of d(h_s), BLOCK_H chunk columns
# per step. One accumulator: a plain GEMM tile.
GRAD_H_CONFIGS = KernelConfigs(
    half=[TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 8, 3),
          TileConfig(128, 128, 32, 8, 3)],
    fp32=[TileConfig(64, 64, 32, 4, 2), TileConfig(128, 64, 32, 8, 2), TileConfig(64, 64, 16, 4, 2)],
)


@autotune(GRAD_LOGITS_CONFIGS, key=["H", "H_T", "MODE", "HAS_DIV", "HAS_LOGP"], dtype_arg="hs_ptr")
@triton.jit
def _grad_logits_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, tgt_ptr, stats_ptr, g_ptr,
                        n_rows, H, H_T, v_begin, v_end, stride_hs, stride_ht, stride_w, stride_wt, stride_g,
                        scale, alpha, log_1m_alpha, log_alpha, ignore_index,
                        MODE: tl.constexpr, HAS_DIV: tl.constexpr, HAS_LOGP: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """G for a [BLOCK_N, BLOCK_V] tile of rows x columns [v_begin, v_end); MODE 0/1/2 = alpha 0/1/JSD.

    stats_ptr: [5, n_rows] fp32 planes lse_s, lse_t, KL term, upstream d(divergence), d(student_logp).
    Ignored rows get G = 0; a tile without a valid row skips its GEMMs.
    """
    row_tile, col_tile = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(v_end - v_begin, BLOCK_V),
                                      GROUP_ROWS)
    offs = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range, valid, tgt = row_validity(tgt_ptr, offs, n_rows, ignore_index)
    any_valid = (tl.max(valid.to(tl.int32), 0) > 0).to(tl.int32)
    local = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_ok = cols < v_end
    stats = stats_ptr + offs
    lse_s = tl.load(stats + 0 * n_rows, mask=valid, other=0.0)

    a = logit_tile(hs_ptr, stride_hs, offs, valid, w_ptr, stride_w, cols, col_ok, H * any_valid, scale,
                   BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_DIV:
        lse_t = tl.load(stats + 1 * n_rows, mask=valid, other=0.0)
        kl = tl.load(stats + 2 * n_rows, mask=valid, other=0.0)
        g_div = tl.load(stats + 3 * n_rows, mask=valid, other=0.0)
        b = logit_tile(ht_ptr, stride_ht, offs, valid, wt_ptr, stride_wt, cols, col_ok, H_T * any_valid, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        logp = a - lse_s[:, None]
        p = tl.exp(logp)
        logq = b - lse_t[:, None]
        if MODE == 0:
            d = p - tl.exp(logq)
        elif MODE == 1:
            d = p * (logp - logq - kl[:, None])
        else:
            d = (1.0 - alpha) * p * (logp - log_mixture(logp, logq, log_1m_alpha, log_alpha) - kl[:, None])
        g += g_div[:, None] * d
    if HAS_LOGP:
        g_logp = tl.load(stats + 4 * n_rows, mask=valid, other=0.0)
        p = tl.exp(a - lse_s[:, None])
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        g += g_logp[:, None] * (onehot - p)
    g = tl.where(valid[:, None], g * scale, 0.0)
    ptrs = g_ptr + offs[:, None] * stride_g + local[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=in_range[:, None] & col_ok[None, :])


@autotune(GRAD_H_CONFIGS, key=["H"], dtype_arg="g_ptr")
@triton.jit
def _grad_hidden_kernel(g_ptr, w_ptr, dh_ptr, n_rows, H, n_cols, stride_g, stride_w, stride_dh,
                        PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """dh[rows, hidden tile] += G[rows, :n_cols] @ W[:n_cols, hidden tile], in fp32 (dh is fp32).

    Each program owns one [BLOCK_N, BLOCK_V] tile of dh (BLOCK_V hidden units here) and walks the
    chunk's columns BLOCK_H at a time: no atomics, and the sum over chunks never leaves fp32.
    """
    row_tile, col_tile = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(H, BLOCK_V), GROUP_ROWS)
    rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    hid = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    hid_ok = hid < H
    out = dh_ptr + rows[:, None] * stride_dh + hid[None, :]
    out_ok = row_ok[:, None] & hid_ok[None, :]
    acc = tl.load(out, mask=out_ok, other=0.0)
    for c0 in range(0, n_cols, BLOCK_H):
        cs = c0 + tl.arange(0, BLOCK_H)
        c_ok = cs < n_cols
        g = tl.load(g_ptr + rows[:, None] * stride_g + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cs.to(tl.int64)[:, None] * stride_w + hid[None, :], mask=c_ok[:, None] & hid_ok[None, :],
                    other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    tl.store(out, acc, mask=out_ok)


def _tile_grid(n_rows: int, n_cols: int):
    """1-D grid of (row tiles x column tiles) for the grouped order of `grouped_tile`."""
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(n_cols, meta["BLOCK_V"]),)


def grad_logits_launch(hs, ht, w, wt, targets, row_stats, g, v0: int, *, alpha: float, temperature: float,
                       ignore_index: int, has_div: bool, has_logp: bool) -> Launch:
    """The G kernel for columns [v0, v0 + g.shape[1]) into the workspace slice `g` [N, chunk]."""
    n_rows, cols = targets.numel(), g.shape[1]
    # Without a divergence gradient the mode is unused: one compiled variant serves every alpha.
    mode = 0 if alpha == 0.0 or not has_div else 1 if alpha == 1.0 else 2
    logs = (math.log1p(-alpha), math.log(alpha)) if mode == 2 else (0.0, 0.0)
    args = dict(hs_ptr=hs, ht_ptr=ht, w_ptr=w, wt_ptr=wt, tgt_ptr=targets, stats_ptr=row_stats, g_ptr=g,
                n_rows=n_rows, H=w.shape[1], H_T=wt.shape[1], v_begin=v0, v_end=v0 + cols,
                stride_hs=hs.stride(0), stride_ht=ht.stride(0), stride_w=w.stride(0), stride_wt=wt.stride(0),
                stride_g=g.stride(0), scale=1.0 / temperature, alpha=alpha, log_1m_alpha=logs[0],
                log_alpha=logs[1], ignore_index=ignore_index, MODE=mode, HAS_DIV=has_div, HAS_LOGP=has_logp,
                PRECISION=dot_precision(w.dtype))
    return Launch(_grad_logits_kernel, _tile_grid(n_rows, cols), args)


def grad_hidden_launch(g, w_chunk, dh) -> Launch:
    """The d(h_s) kernel: dh [N, H] fp32 += g [N, chunk] @ w_chunk [chunk, H]."""
    n_rows, hidden = dh.shape
    args = dict(g_ptr=g, w_ptr=w_chunk, dh_ptr=dh, n_rows=n_rows, H=hidden, n_cols=g.shape[1],
                stride_g=g.stride(0), stride_w=w_chunk.stride(0), stride_dh=dh.stride(0),
                PRECISION=dot_precision(w_chunk.dtype))
    return Launch(_grad_hidden_kernel, _tile_grid(n_rows, hidden), args)


def chunk_columns(n_rows: int, vocab: int, itemsize: int, workspace_bytes: int) -> int:
    """Vocabulary columns per chunk: as many as the workspace holds, a multiple of 128 (at least 128)."""
    fit = workspace_bytes // max(1, n_rows * itemsize) // _CHUNK_ALIGN * _CHUNK_ALIGN
    return min(max(fit, _CHUNK_ALIGN), vocab)


def distill_backward(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, targets: torch.Tensor,
                     row_stats: torch.Tensor, *, alpha: float, temperature: float, ignore_index: int,
                     has_div: bool, has_logp: bool, need_h: bool, need_w: bool,
                     workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d h_s [N, H] fp32, d weight [V, H] in w's dtype); None where not needed. Ignored rows (target
    `ignore_index`) get zero gradient and contribute nothing; no host synchronisation.

    `row_stats` [5, N] fp32: lse_s, lse_t, the KL term of RowStats.kl, and the upstream gradients of
    divergence and student_logp.
    """
    n_rows, (vocab, hidden) = targets.numel(), w.shape
    chunk = chunk_columns(n_rows, vocab, w.element_size(), workspace_bytes)
    workspace = torch.empty(n_rows, chunk, dtype=w.dtype, device=w.device)
    grad_h = torch.zeros(n_rows, hidden, dtype=torch.float32, device=w.device) if need_h else None
    grad_w = torch.empty_like(w) if need_w else None
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        g = workspace[:, : v1 - v0]
        grad_logits_launch(hs, ht, w, wt, targets, row_stats, g, v0, alpha=alpha, temperature=temperature,
                           ignore_index=ignore_index, has_div=has_div, has_logp=has_logp)()
        if need_h:
            grad_hidden_launch(g, w[v0:v1], grad_h)()
        if need_w:
            torch.mm(g.T, hs, out=grad_w[v0:v1])
    return grad_h, grad_w
