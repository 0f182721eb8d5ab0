"""Forward kernels of linear_distill: per-row statistics of both logit streams without [N, V] logits.

Grid: (vocabulary splits, row tiles), the split index varying fastest, so the programs resident at once
share a few row tiles of hidden states (kept in L2 for their whole vocabulary walk) and stream the
weight tiles of all splits. Every program walks its split's vocabulary in tiles, computes the student
tile a = h_s W^T / T and then the teacher tile b = h_t W_t^T / T with `tl.dot` (fp32 accumulation;
only `a` stays live across the teacher's GEMM, every elementwise term is formed after it), and folds
them into an online-softmax state per row. Each program writes its own partial state to a
[STATS, SPLITS, N] buffer (no atomics, no locks); a small merge kernel then combines the splits with the
same associative `combine` and finalises the per-row results. Alpha in {0, 1} needs this one pass only;
the JSD needs both log-normalisers first, so a second pass sums its terms.

Every row is computed in place (no row selection, hence no host synchronisation): rows whose target is
`ignore_index` read no hidden state, a row tile without a valid row skips its vocabulary walk, and the
merge writes zeros for them.

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
    KernelConfigs,
    Launch,
    TileConfig,
    autotune,
    device_programs,
    dot_precision,
    log_mixture,
    logit_tile,
    row_validity,
)

# Partial states: [_STATS, splits, rows], in the order m_a, z_a, e_a, k_a, m_b, z_b, k_b, a_y, b_y.
_STATS = 9

# The forward's configs (defaults first), separately for the stats and JSD kernels. Two fp32
# [BLOCK_N, BLOCK_V] tiles are live across the teacher GEMM, so each thread holds at most 32 elements
# of a tile (BLOCK_N * BLOCK_V / (32 * warps)); larger tiles spill on sm_80 and, for the JSD, on sm_90.
# Every entry compiles without spills on sm_90 and sm_80 with Triton 3.6 and 3.9
# (`python -m sdpo_fast.kernels.resources`). Pre-Hopper GPUs get their own half lists: there ptxas
# (Triton 3.6) spills the 64 x 128 x 64 tiles of the student-only stats kernel and of the JSD pass, and
# the JSD's 64 x 64 x 32 tile at 3 stages. fp32 inputs use 3xTF32 products, which need about three
# times the operand registers: smaller tiles, and 8 warps for the 64 x 64 default (4 warps spill the
# JSD pass on sm_90 and the teacher stats on sm_80).
_FP32_CONFIGS = [TileConfig(64, 64, 16, 8, 2), TileConfig(32, 64, 32, 4, 2), TileConfig(64, 32, 32, 4, 2)]
STATS_CONFIGS = KernelConfigs(
    half=[TileConfig(64, 128, 64, 8, 3), TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 32, 8, 3),
          TileConfig(64, 64, 64, 4, 3)],
    fp32=_FP32_CONFIGS,
    half_sm80=[TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 64, 4, 3)],
)
JSD_CONFIGS = KernelConfigs(
    half=[TileConfig(64, 128, 64, 8, 3), TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 32, 4, 3)],
    fp32=_FP32_CONFIGS,
    half_sm80=[TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 32, 4, 2)],
)
_MERGE_BLOCK = 128
# Hidden states of the row tiles resident at once should fit in this share of L2 (see `num_splits`).
_L2_SHARE = 0.5
# Row tile the split count is sized for (the most common BLOCK_N of the configs).
_SIZING_ROWS = 64


class RowStats(NamedTuple):
    """Per row, fp32 (zeros for ignored rows): the op's outputs and what backward needs (log-normalisers, KL term)."""

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
    first = tl.program_id(0) * per_split
    return first, tl.minimum(first + per_split, n_tiles)


@triton.jit
def _row_tile(tgt_ptr, n_rows, ignore_index, V, SPLITS, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's rows (int64), their validity, targets and vocabulary tiles [first, last); a tile
    without a valid row gets an empty range."""
    offs = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range, valid, tgt = row_validity(tgt_ptr, offs, n_rows, ignore_index)
    first, last = _split_range(V, SPLITS, BLOCK_V)
    last = tl.where(tl.max(valid.to(tl.int32), 0) > 0, last, first)
    return offs, in_range, valid, tgt, first, last


@autotune(STATS_CONFIGS, key=["H", "H_T", "V", "HAS_TEACHER"], dtype_arg="hs_ptr")
@triton.jit
def _stats_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, tgt_ptr, part_ptr,
                  n_rows, H, H_T, V, SPLITS, stride_hs, stride_ht, stride_w, stride_wt, scale, ignore_index,
                  HAS_TEACHER: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial states of one (split, row tile). Without HAS_TEACHER (`linear_logprobs`) no teacher tile
    is computed: the teacher state mirrors the student's (as if b = a), so the merged KL terms are 0."""
    offs, in_range, valid, tgt, first, last = _row_tile(tgt_ptr, n_rows, ignore_index, V, SPLITS,
                                                        BLOCK_N, BLOCK_V)
    m_a = tl.full((BLOCK_N,), EMPTY_MAX, tl.float32)
    m_b = tl.full((BLOCK_N,), EMPTY_MAX, tl.float32)
    z_a = tl.zeros((BLOCK_N,), tl.float32)
    e_a = tl.zeros((BLOCK_N,), tl.float32)
    k_a = tl.zeros((BLOCK_N,), tl.float32)
    z_b = tl.zeros((BLOCK_N,), tl.float32)
    k_b = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok = col_ok[None, :]
        a = logit_tile(hs_ptr, stride_hs, offs, valid, w_ptr, stride_w, cols, col_ok, H, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        tm_a = tl.max(tl.where(ok, a, float("-inf")), 1)
        if HAS_TEACHER:
            # Only `a` is live across this GEMM; the elementwise terms of both tiles come after it.
            b = logit_tile(ht_ptr, stride_ht, offs, valid, wt_ptr, stride_wt, cols, col_ok, H_T, scale,
                           BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
            tm_b = tl.max(tl.where(ok, b, float("-inf")), 1)
            u = tl.where(ok, a - tm_a[:, None], 0.0)
            w = tl.where(ok, b - tm_b[:, None], 0.0)
            eu = tl.where(ok, tl.exp(u), 0.0)
            ew = tl.where(ok, tl.exp(w), 0.0)
            tz_b = tl.sum(ew, 1)
            tk_a = tl.sum(eu * (u - w), 1)
            tk_b = tl.sum(ew * (w - u), 1)
        else:
            u = tl.where(ok, a - tm_a[:, None], 0.0)
            eu = tl.where(ok, tl.exp(u), 0.0)
            tm_b = tm_a
            tz_b = tl.sum(eu, 1)
            tk_a = tl.zeros((BLOCK_N,), tl.float32)
            tk_b = tl.zeros((BLOCK_N,), tl.float32)
        m_a, z_a, e_a, k_a, m_b, z_b, k_b = combine(
            m_a, z_a, e_a, k_a, m_b, z_b, k_b,
            tm_a, tl.sum(eu, 1), tl.sum(eu * u, 1), tk_a,
            tm_b, tz_b, tk_b,
        )

    # The targets' logits, once per row (by split 0): a row of W per row instead of a compare per tile.
    a_y = tl.zeros((BLOCK_N,), tl.float32)
    b_y = tl.zeros((BLOCK_N,), tl.float32)
    if tl.program_id(0) == 0:
        a_y = _target_logit(hs_ptr, stride_hs, offs, valid, w_ptr, stride_w, tgt, H, scale, BLOCK_N, BLOCK_H)
        if HAS_TEACHER:
            b_y = _target_logit(ht_ptr, stride_ht, offs, valid, wt_ptr, stride_wt, tgt, H_T, scale, BLOCK_N, BLOCK_H)
    # One plane per statistic; this program owns column `split` of every plane.
    _store_state(part_ptr + tl.program_id(0).to(tl.int64) * n_rows + offs, SPLITS * n_rows, in_range,
                 m_a, z_a, e_a, k_a, m_b, z_b, k_b, a_y, b_y)


@triton.jit
def _target_logit(h_ptr, stride_h, rows, valid, w_ptr, stride_w, tgt, K, scale,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 logits (h[rows] . w[tgt]) * scale of the valid rows' targets (0 for the others)."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    w_rows = w_ptr + tl.maximum(tgt, 0).to(tl.int64)[:, None] * stride_w
    h_rows = h_ptr + rows[:, None] * stride_h
    for k0 in range(0, K, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        m = valid[:, None] & (ks < K)[None, :]
        h = tl.load(h_rows + ks[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, 1)
    return acc * scale


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
def _merge_kernel(part_ptr, out_ptr, tgt_ptr, n_rows, SPLITS, ignore_index, BLOCK: tl.constexpr):
    """Combine the splits' states of each row and write [7, n_rows] finals (RowStats order, but the
    divergence slot holds KL(q||p) and the kl slot KL(p||q)); zeros for ignored rows."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask, valid, _ = row_validity(tgt_ptr, offs, n_rows, ignore_index)
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
        ptr = part_ptr + split * n_rows + offs
        m_a, z_a, e_a, k_a, m_b, z_b, k_b = combine(
            m_a, z_a, e_a, k_a, m_b, z_b, k_b,
            tl.load(ptr, mask=valid, other=EMPTY_MAX),
            tl.load(ptr + plane, mask=valid, other=0.0),
            tl.load(ptr + 2 * plane, mask=valid, other=0.0),
            tl.load(ptr + 3 * plane, mask=valid, other=0.0),
            tl.load(ptr + 4 * plane, mask=valid, other=EMPTY_MAX),
            tl.load(ptr + 5 * plane, mask=valid, other=0.0),
            tl.load(ptr + 6 * plane, mask=valid, other=0.0),
        )
        # Exactly one split holds the target's column; the others contribute 0.
        a_y += tl.load(ptr + 7 * plane, mask=valid, other=0.0)
        b_y += tl.load(ptr + 8 * plane, mask=valid, other=0.0)
    # Ignored lanes hold z = 0; give them z = 1 and m = 0 so they compute zeros.
    z_a = tl.where(valid, z_a, 1.0)
    z_b = tl.where(valid, z_b, 1.0)
    m_a = tl.where(valid, m_a, 0.0)
    m_b = tl.where(valid, m_b, 0.0)
    log_za = tl.log(z_a)
    log_zb = tl.log(z_b)
    lse_s = m_a + log_za
    lse_t = m_b + log_zb
    out = out_ptr + offs
    tl.store(out, k_b / z_b - log_zb + log_za, mask=mask)
    tl.store(out + n_rows, a_y - lse_s, mask=mask)
    tl.store(out + 2 * n_rows, b_y - lse_t, mask=mask)
    tl.store(out + 3 * n_rows, log_za - e_a / z_a, mask=mask)
    tl.store(out + 4 * n_rows, lse_s, mask=mask)
    tl.store(out + 5 * n_rows, lse_t, mask=mask)
    tl.store(out + 6 * n_rows, k_a / z_a - log_za + log_zb, mask=mask)


@autotune(JSD_CONFIGS, key=["H", "H_T", "V"], dtype_arg="hs_ptr")
@triton.jit
def _jsd_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, tgt_ptr, lse_ptr, part_ptr,
                n_rows, H, H_T, V, SPLITS, stride_hs, stride_ht, stride_w, stride_wt, scale, ignore_index,
                log_1m_alpha, log_alpha,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Second JSD pass: partial sums of KL(p||M) and KL(q||M) per split, given both log-normalisers
    (zeros for ignored rows)."""
    offs, in_range, valid, _, first, last = _row_tile(tgt_ptr, n_rows, ignore_index, V, SPLITS,
                                                      BLOCK_N, BLOCK_V)
    lse_s = tl.load(lse_ptr + offs, mask=valid, other=0.0)
    lse_t = tl.load(lse_ptr + n_rows + offs, mask=valid, other=0.0)
    kl_sm = tl.zeros((BLOCK_N,), tl.float32)
    kl_tm = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        a = logit_tile(hs_ptr, stride_hs, offs, valid, w_ptr, stride_w, cols, col_ok, H, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        b = logit_tile(ht_ptr, stride_ht, offs, valid, wt_ptr, stride_wt, cols, col_ok, H_T, scale,
                       BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        logp = a - lse_s[:, None]
        logq = b - lse_t[:, None]
        logm = log_mixture(logp, logq, log_1m_alpha, log_alpha)
        ok = col_ok[None, :]
        kl_sm += tl.sum(tl.where(ok, tl.exp(logp) * (logp - logm), 0.0), 1)
        kl_tm += tl.sum(tl.where(ok, tl.exp(logq) * (logq - logm), 0.0), 1)
    out = part_ptr + tl.program_id(0).to(tl.int64) * n_rows + offs
    tl.store(out, tl.where(valid, kl_sm, 0.0), mask=in_range)
    tl.store(out + SPLITS * n_rows, tl.where(valid, kl_tm, 0.0), mask=in_range)


def num_splits(n_rows: int, vocab: int, width: int, itemsize: int, *, programs: int, l2_bytes: int) -> int:
    """Vocabulary splits of the forward grid (any positive integer; not a power of two).

    Enough splits that (row tiles x splits) gives `programs` programs even for few rows, and enough
    that the programs resident at once (split-fastest order) cover at most as many row tiles as fit,
    hidden states of both streams (`width` = H + H_t columns of `itemsize` bytes), in half of L2. At most
    one split per 512 vocabulary columns, so that each split still amortises its start-up. Splits are
    not part of any autotuning key, so a new token count never retunes.
    """
    row_tiles = triton.cdiv(n_rows, _SIZING_ROWS)
    resident_rows = max(1, int(_L2_SHARE * l2_bytes) // (_SIZING_ROWS * width * itemsize))
    want = max(triton.cdiv(programs, row_tiles), triton.cdiv(programs, resident_rows))
    return max(1, min(want, vocab // 512))


def device_splits(n_rows: int, vocab: int, width: int, itemsize: int, device: torch.device) -> int:
    """`num_splits` for `device` (its SMs and L2; small fixed numbers off-GPU)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 20
    return num_splits(n_rows, vocab, width, itemsize, programs=device_programs(device), l2_bytes=l2)


def _common_args(hs, ht, w, wt, targets, splits: int, temperature: float, ignore_index: int) -> dict:
    return dict(n_rows=targets.numel(), H=w.shape[1], H_T=wt.shape[1], V=w.shape[0], SPLITS=splits,
                stride_hs=hs.stride(0), stride_ht=ht.stride(0), stride_w=w.stride(0), stride_wt=wt.stride(0),
                scale=1.0 / temperature, ignore_index=ignore_index, PRECISION=dot_precision(w.dtype))


def _grid(n_rows: int, splits: int):
    return lambda meta: (splits, triton.cdiv(n_rows, meta["BLOCK_N"]))


def stats_launch(hs, ht, w, wt, targets, part, *, temperature: float, ignore_index: int,
                 has_teacher: bool) -> Launch:
    """The stats kernel writing partial states into `part` [_STATS, splits, N]."""
    splits = part.shape[1]
    args = dict(hs_ptr=hs, ht_ptr=ht, w_ptr=w, wt_ptr=wt, tgt_ptr=targets, part_ptr=part,
                **_common_args(hs, ht, w, wt, targets, splits, temperature, ignore_index), HAS_TEACHER=has_teacher)
    return Launch(_stats_kernel, _grid(targets.numel(), splits), args)


def merge_launch(part, final, targets, *, ignore_index: int) -> Launch:
    """The merge kernel: partial states `part` -> finals `final` [7, N]."""
    n_rows = targets.numel()
    args = dict(part_ptr=part, out_ptr=final, tgt_ptr=targets, n_rows=n_rows, SPLITS=part.shape[1],
                ignore_index=ignore_index, BLOCK=_MERGE_BLOCK)
    return Launch(_merge_kernel, (triton.cdiv(n_rows, _MERGE_BLOCK),), args)


def jsd_launch(hs, ht, w, wt, targets, lse, part, *, alpha: float, temperature: float,
               ignore_index: int) -> Launch:
    """The JSD pass writing [2, splits, N] partial sums into `part`, given log-normalisers `lse` [2, N]."""
    splits = part.shape[1]
    args = dict(hs_ptr=hs, ht_ptr=ht, w_ptr=w, wt_ptr=wt, tgt_ptr=targets, lse_ptr=lse, part_ptr=part,
                **_common_args(hs, ht, w, wt, targets, splits, temperature, ignore_index),
                log_1m_alpha=math.log1p(-alpha), log_alpha=math.log(alpha))
    return Launch(_jsd_kernel, _grid(targets.numel(), splits), args)


def distill_forward(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, targets: torch.Tensor,
                    *, alpha: float, temperature: float, ignore_index: int, splits: int | None = None) -> RowStats:
    """Per-row statistics of every row (zeros where `targets` is `ignore_index`), without a host sync.

    hs [N, H], ht [N, H_t], w [V, H], wt [V, H_t]: fp16/bf16/fp32 with contiguous last dimensions;
    targets [N] int64. `splits` overrides the number of vocabulary splits (tests use it to exercise the merge).
    """
    splits = splits or device_splits(targets.numel(), w.shape[0], w.shape[1] + wt.shape[1], w.element_size(),
                                     hs.device)
    part, final = _merged_stats(hs, ht, w, wt, targets, splits, temperature, ignore_index, has_teacher=True)
    kl_qp, logp_y, logq_y, entropy, lse_s, lse_t, kl_pq = final
    if alpha == 0.0:
        return RowStats(kl_qp, logp_y, logq_y, entropy, lse_s, lse_t, torch.zeros_like(kl_pq))
    if alpha == 1.0:
        return RowStats(kl_pq, logp_y, logq_y, entropy, lse_s, lse_t, kl_pq)

    jsd_part = part[:2]  # reuse the buffer: [2, splits, n_rows]
    jsd_launch(hs, ht, w, wt, targets, final[4:6], jsd_part, alpha=alpha, temperature=temperature,
               ignore_index=ignore_index)()
    kl_sm, kl_tm = jsd_part.sum(1)
    return RowStats((1.0 - alpha) * kl_sm + alpha * kl_tm, logp_y, logq_y, entropy, lse_s, lse_t, kl_sm)


def _merged_stats(hs, ht, w, wt, targets, splits: int, temperature: float, ignore_index: int, *, has_teacher: bool):
    """Run the stats and merge kernels: (partial-state buffer [_STATS, splits, N], finals [7, N])."""
    n_rows = targets.numel()
    part = torch.empty(_STATS, splits, n_rows, dtype=torch.float32, device=hs.device)
    stats_launch(hs, ht, w, wt, targets, part, temperature=temperature, ignore_index=ignore_index,
                 has_teacher=has_teacher)()
    final = torch.empty(7, n_rows, dtype=torch.float32, device=hs.device)
    merge_launch(part, final, targets, ignore_index=ignore_index)()
    return part, final


def logprobs_forward(hs: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                     ignore_index: int, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student only (`linear_logprobs`): (log p(y), entropy, log-normaliser) of every row, fp32 (zeros
    where ignored). One pass of the stats kernel without its teacher tile (no second GEMM), then the merge.
    """
    splits = splits or device_splits(targets.numel(), w.shape[0], w.shape[1], w.element_size(), hs.device)
    _, final = _merged_stats(hs, hs, w, w, targets, splits, temperature, ignore_index, has_teacher=False)
    return final[1], final[3], final[4]
