"""Forward kernels of linear_distill: per-row statistics of both logit streams without [N, V] logits.

Grid: (row tiles) x (vocabulary splits). Every program walks its share of the vocabulary in tiles,
computes the student tile a = h_s W^T / T and the teacher tile b = h_t W_t^T / T with `tl.dot` (fp32
accumulation), and folds them into an online-softmax state per row. Each program writes its own partial
state to a [STATS, SPLITS, N] buffer (no atomics, no locks); a small merge kernel then combines the
splits with the same associative `combine` and finalises the per-row results. Alpha in {0, 1} needs this
one pass only; the JSD needs both log-normalisers first, so a second pass sums its terms.

State per row, relative to running maxima m_a, m_b (u = a - m_a, w = b - m_b, so large common logit
offsets never cancel): z_a = sum e^u, e_a = sum e^u u, k_a = sum e^u (u - w), z_b = sum e^w,
k_b = sum e^w (w - u), plus the target's logits a_y, b_y. Then, with A = m_a + ln z_a, B = m_b + ln z_b:
KL(p||q) = k_a / z_a - ln z_a + ln z_b, KL(q||p) = k_b / z_b - ln z_b + ln z_a, H(p) = ln z_a - e_a / z_a,
log p(y) = a_y - A, log q(y) = b_y - B.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sdpo_fast.kernels.common import (
    EMPTY_MAX,
    autotune_configs,
    device_programs,
    dot_precision,
    log_mixture,
    logit_tile,
)

# Partial states: [_STATS, splits, rows], in the order m_a, z_a, e_a, k_a, m_b, z_b, k_b, a_y, b_y.
_STATS = 9

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages): two fp32 [BLOCK_N, BLOCK_V] accumulators live at
# once, so 128 x 128 with 8 warps is the largest tile that stays in registers.
_GPU_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
]
_MERGE_BLOCK = 128


class RowStats(NamedTuple):
    """Per valid row, fp32: the op's outputs and what backward needs (log-normalisers, KL term)."""

    divergence: torch.Tensor
    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    entropy: torch.Tensor
    lse_student: torch.Tensor
    lse_teacher: torch.Tensor
    kl: torch.Tensor  # KL(p||q) for alpha = 1, KL(p||M) for the JSD, zeros for alpha = 0


@triton.jit
def combine(m_a, z_a, e_a, k_a, m_b, z_b, k_b, m_a2, z_a2, e_a2, k_a2, m_b2, z_b2, k_b2):
    """Merge two online-softmax states (see the module docstring); associative and commutative."""
    new_a = tl.maximum(m_a, m_a2)
    new_b = tl.maximum(m_b, m_b2)
    d1 = new_a - m_a
    d2 = new_a - m_a2
    f1 = new_b - m_b
    f2 = new_b - m_b2
    s1 = tl.exp(-d1)
    s2 = tl.exp(-d2)
    t1 = tl.exp(-f1)
    t2 = tl.exp(-f2)
    # u' = u - d, w' = w - f: e^u' (u' - w') = e^-d e^u (u - w + f - d), e^u' u' = e^-d e^u (u - d).
    k_a = s1 * (k_a + (f1 - d1) * z_a) + s2 * (k_a2 + (f2 - d2) * z_a2)
    e_a = s1 * (e_a - d1 * z_a) + s2 * (e_a2 - d2 * z_a2)
    k_b = t1 * (k_b + (d1 - f1) * z_b) + t2 * (k_b2 + (d2 - f2) * z_b2)
    z_a = s1 * z_a + s2 * z_a2
    z_b = t1 * z_b + t2 * z_b2
    return new_a, z_a, e_a, k_a, new_b, z_b, k_b


@triton.jit
def _split_range(V, SPLITS, BLOCK_V: tl.constexpr):
    """[first, last) vocabulary tiles of this program's split (empty when SPLITS exceeds the tiles)."""
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, SPLITS)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, n_tiles)


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS), key=["H", "H_T", "V", "SPLITS", "HAS_TEACHER"])
@triton.jit
def _stats_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, rows_ptr, tgt_ptr, part_ptr,
                  n_rows, H, H_T, V, SPLITS, stride_hs, stride_ht, stride_w, stride_wt, scale,
                  HAS_TEACHER: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial states of one (row tile, split). Without HAS_TEACHER (`linear_logprobs`) no teacher tile is
    computed: the teacher state mirrors the student's (as if b = a), so the merged KL terms are 0."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + offs, mask=row_ok, other=-1)
    first, last = _split_range(V, SPLITS, BLOCK_V)

    m_a = tl.full((BLOCK_N,), EMPTY_MAX, tl.float32)
    m_b = tl.full((BLOCK_N,), EMPTY_MAX, tl.float32)
    z_a = tl.zeros((BLOCK_N,), tl.float32)
    e_a = tl.zeros((BLOCK_N,), tl.float32)
    k_a = tl.zeros((BLOCK_N,), tl.float32)
    z_b = tl.zeros((BLOCK_N,), tl.float32)
    k_b = tl.zeros((BLOCK_N,), tl.float32)
    a_y = tl.zeros((BLOCK_N,), tl.float32)
    b_y = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok = col_ok[None, :]
        a = logit_tile(hs_ptr, stride_hs, rows, row_ok, w_ptr, stride_w, cols, col_ok, H, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        # The target is matched only inside the real vocabulary.
        hit = (cols[None, :] == tgt[:, None]) & ok
        a_y += tl.sum(tl.where(hit, a, 0.0), 1)
        # The tile's own state, relative to its maxima (every tile has at least one real column).
        tm_a = tl.max(tl.where(ok, a, float("-inf")), 1)
        u = tl.where(ok, a - tm_a[:, None], 0.0)
        eu = tl.where(ok, tl.exp(u), 0.0)
        tz_a = tl.sum(eu, 1)
        if HAS_TEACHER:
            b = logit_tile(ht_ptr, stride_ht, rows, row_ok, wt_ptr, stride_wt, cols, col_ok, H_T, scale,
                           BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
            b_y += tl.sum(tl.where(hit, b, 0.0), 1)
            tm_b = tl.max(tl.where(ok, b, float("-inf")), 1)
            w = tl.where(ok, b - tm_b[:, None], 0.0)
            ew = tl.where(ok, tl.exp(w), 0.0)
            tz_b = tl.sum(ew, 1)
            tk_a = tl.sum(eu * (u - w), 1)
            tk_b = tl.sum(ew * (w - u), 1)
        else:
            tm_b = tm_a
            tz_b = tz_a
            tk_a = tl.zeros((BLOCK_N,), tl.float32)
            tk_b = tl.zeros((BLOCK_N,), tl.float32)
        m_a, z_a, e_a, k_a, m_b, z_b, k_b = combine(
            m_a, z_a, e_a, k_a, m_b, z_b, k_b,
            tm_a, tz_a, tl.sum(eu * u, 1), tk_a,
            tm_b, tz_b, tk_b,
        )

    # One plane per statistic; this program owns column `split` of every plane.
    _store_state(part_ptr + tl.program_id(1).to(tl.int64) * n_rows + offs, SPLITS * n_rows, row_ok,
                 m_a, z_a, e_a, k_a, m_b, z_b, k_b, a_y, b_y)


@triton.jit
def _store_state(ptr, plane, mask, m_a, z_a, e_a, k_a, m_b, z_b, k_b, a_y, b_y):
    """Store a state (m_a .. b_y), one plane apart."""
    tl.store(ptr, m_a, mask=mask)
    tl.store(ptr + plane, z_a, mask=mask)
    tl.store(ptr + 2 * plane, e_a, mask=mask)
    tl.store(ptr + 3 * plane, k_a, mask=mask)
    tl.store(ptr + 4 * plane, m_b, mask=mask)
    tl.store(ptr + 5 * plane, z_b, mask=mask)
    tl.store(ptr + 6 * plane, k_b, mask=mask)
    tl.store(ptr + 7 * plane, a_y, mask=mask)
    tl.store(ptr + 8 * plane, b_y, mask=mask)


@triton.jit
def _merge_kernel(part_ptr, out_ptr, n_rows, SPLITS, BLOCK: tl.constexpr):
    """Combine the splits' states of each row and write [7, n_rows] finals (RowStats order, but the
    divergence slot holds KL(q||p) and the kl slot KL(p||q))."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    plane = SPLITS * n_rows
    m_a = tl.full((BLOCK,), EMPTY_MAX, tl.float32)
    m_b = tl.full((BLOCK,), EMPTY_MAX, tl.float32)
    z_a = tl.zeros((BLOCK,), tl.float32)
    e_a = tl.zeros((BLOCK,), tl.float32)
    k_a = tl.zeros((BLOCK,), tl.float32)
    z_b = tl.zeros((BLOCK,), tl.float32)
    k_b = tl.zeros((BLOCK,), tl.float32)
    a_y = tl.zeros((BLOCK,), tl.float32)
    b_y = tl.zeros((BLOCK,), tl.float32)
    for split in range(SPLITS):
        ptr = part_ptr + split * n_rows + offs.to(tl.int64)
        m_a, z_a, e_a, k_a, m_b, z_b, k_b = combine(
            m_a, z_a, e_a, k_a, m_b, z_b, k_b,
            tl.load(ptr, mask=mask, other=EMPTY_MAX),
            tl.load(ptr + plane, mask=mask, other=0.0),
            tl.load(ptr + 2 * plane, mask=mask, other=0.0),
            tl.load(ptr + 3 * plane, mask=mask, other=0.0),
            tl.load(ptr + 4 * plane, mask=mask, other=EMPTY_MAX),
            tl.load(ptr + 5 * plane, mask=mask, other=0.0),
            tl.load(ptr + 6 * plane, mask=mask, other=0.0),
        )
        # Exactly one split holds the target's column; the others contribute 0.
        a_y += tl.load(ptr + 7 * plane, mask=mask, other=0.0)
        b_y += tl.load(ptr + 8 * plane, mask=mask, other=0.0)
    # Masked lanes hold z = 0; give them z = 1 so they compute harmless numbers (never stored).
    z_a = tl.where(mask, z_a, 1.0)
    z_b = tl.where(mask, z_b, 1.0)
    log_za = tl.log(z_a)
    log_zb = tl.log(z_b)
    lse_s = m_a + log_za
    lse_t = m_b + log_zb
    out = out_ptr + offs.to(tl.int64)
    tl.store(out, k_b / z_b - log_zb + log_za, mask=mask)
    tl.store(out + n_rows, a_y - lse_s, mask=mask)
    tl.store(out + 2 * n_rows, b_y - lse_t, mask=mask)
    tl.store(out + 3 * n_rows, log_za - e_a / z_a, mask=mask)
    tl.store(out + 4 * n_rows, lse_s, mask=mask)
    tl.store(out + 5 * n_rows, lse_t, mask=mask)
    tl.store(out + 6 * n_rows, k_a / z_a - log_za + log_zb, mask=mask)


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS), key=["H", "H_T", "V", "SPLITS"])
@triton.jit
def _jsd_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, rows_ptr, lse_ptr, part_ptr,
                n_rows, H, H_T, V, SPLITS, stride_hs, stride_ht, stride_w, stride_wt, scale,
                log_1m_alpha, log_alpha,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Second JSD pass: partial sums of KL(p||M) and KL(q||M) per split, given both log-normalisers."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=row_ok, other=0)
    lse_s = tl.load(lse_ptr + offs, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_ptr + n_rows + offs, mask=row_ok, other=0.0)
    first, last = _split_range(V, SPLITS, BLOCK_V)
    kl_sm = tl.zeros((BLOCK_N,), tl.float32)
    kl_tm = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        a = logit_tile(hs_ptr, stride_hs, rows, row_ok, w_ptr, stride_w, cols, col_ok, H, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        b = logit_tile(ht_ptr, stride_ht, rows, row_ok, wt_ptr, stride_wt, cols, col_ok, H_T, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        logp = a - lse_s[:, None]
        logq = b - lse_t[:, None]
        logm = log_mixture(logp, logq, log_1m_alpha, log_alpha)
        ok = col_ok[None, :]
        kl_sm += tl.sum(tl.where(ok, tl.exp(logp) * (logp - logm), 0.0), 1)
        kl_tm += tl.sum(tl.where(ok, tl.exp(logq) * (logq - logm), 0.0), 1)
    out = part_ptr + tl.program_id(1).to(tl.int64) * n_rows + offs
    tl.store(out, kl_sm, mask=row_ok)
    tl.store(out + SPLITS * n_rows, kl_tm, mask=row_ok)


def num_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits so that (row tiles x splits) fills the device even for few rows.

    A power of two (so autotuning, keyed on it, sees few distinct values), at most one split per 512
    vocabulary columns so that each split still amortises its start-up.
    """
    row_tiles = triton.cdiv(n_rows, 128)
    want = triton.next_power_of_2(triton.cdiv(device_programs(device), row_tiles))
    return max(1, min(want, vocab // 512))


def distill_forward(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, rows: torch.Tensor,
                    targets: torch.Tensor, *, alpha: float, temperature: float,
                    splits: int | None = None) -> RowStats:
    """Per-row statistics of the valid rows `rows` (int64 indices into hs/ht; `targets` their tokens).

    hs [N, H], ht [N, H_t], w [V, H], wt [V, H_t]: fp16/bf16/fp32 with contiguous last dimensions.
    `splits` overrides the number of vocabulary splits (tests use it to exercise the merge).
    """
    n_rows, (vocab, hidden), hidden_t = rows.numel(), w.shape, wt.shape[1]
    splits = splits or num_splits(n_rows, vocab, hs.device)
    args = dict(n_rows=n_rows, H=hidden, H_T=hidden_t, V=vocab, SPLITS=splits, stride_hs=hs.stride(0),
                stride_ht=ht.stride(0), stride_w=w.stride(0), stride_wt=wt.stride(0), scale=1.0 / temperature,
                PRECISION=dot_precision(w.dtype))
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits)  # noqa: E731
    part, final = _merged_stats(grid, hs, ht, w, wt, rows, targets, args, has_teacher=True)
    kl_qp, logp_y, logq_y, entropy, lse_s, lse_t, kl_pq = final
    if alpha == 0.0:
        return RowStats(kl_qp, logp_y, logq_y, entropy, lse_s, lse_t, torch.zeros_like(kl_pq))
    if alpha == 1.0:
        return RowStats(kl_pq, logp_y, logq_y, entropy, lse_s, lse_t, kl_pq)

    jsd_part = part[:2]  # reuse the buffer: [2, splits, n_rows]
    _jsd_kernel[grid](hs, ht, w, wt, rows, final[4:6], jsd_part, **args,
                      log_1m_alpha=math.log1p(-alpha), log_alpha=math.log(alpha))
    kl_sm, kl_tm = jsd_part.sum(1)
    return RowStats((1.0 - alpha) * kl_sm + alpha * kl_tm, logp_y, logq_y, entropy, lse_s, lse_t, kl_sm)


def _merged_stats(grid, hs, ht, w, wt, rows, targets, args: dict, *, has_teacher: bool):
    """Run the stats and merge kernels: (partial-state buffer [_STATS, splits, n], finals [7, n])."""
    n_rows, splits = args["n_rows"], args["SPLITS"]
    part = torch.empty(_STATS, splits, n_rows, dtype=torch.float32, device=hs.device)
    _stats_kernel[grid](hs, ht, w, wt, rows, targets, part, **args, HAS_TEACHER=has_teacher)
    final = torch.empty(7, n_rows, dtype=torch.float32, device=hs.device)
    _merge_kernel[(triton.cdiv(n_rows, _MERGE_BLOCK),)](part, final, n_rows, splits, BLOCK=_MERGE_BLOCK)
    return part, final


def logprobs_forward(hs: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, *,
                     temperature: float, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student only (`linear_logprobs`): (log p(y), entropy, log-normaliser) of the valid rows `rows`, fp32.

    One pass of the stats kernel without its teacher tile (no second GEMM), then the merge.
    """
    n_rows, (vocab, hidden) = rows.numel(), w.shape
    splits = splits or num_splits(n_rows, vocab, hs.device)
    args = dict(n_rows=n_rows, H=hidden, H_T=hidden, V=vocab, SPLITS=splits, stride_hs=hs.stride(0),
                stride_ht=hs.stride(0), stride_w=w.stride(0), stride_wt=w.stride(0), scale=1.0 / temperature,
                PRECISION=dot_precision(w.dtype))
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits)  # noqa: E731
    _, final = _merged_stats(grid, hs, hs, w, w, rows, targets, args, has_teacher=False)
    return final[1], final[3], final[4]
