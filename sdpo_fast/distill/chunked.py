"""impl="chunked": pure-PyTorch `linear_distill` (and `linear_logprobs`) with memory bounded independently of N x V.

Forward walks over chunks of valid token rows, computes both logit blocks [C, V] of the chunk and keeps
only per-row statistics (log-normalisers, a KL term, top-k indices). Backward recomputes the blocks
chunk by chunk, forms the gradient w.r.t. the student logits in closed form (top-k too, on the small
[C, k + 1] support), and applies it with two GEMMs: d(student_hidden) per chunk and d(weight)
accumulated in float32. Ignored rows are never computed. Works on CPU and GPU. `linear_logprobs` is the
same walk over the student's blocks only: no teacher GEMM, forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdpo_fast.distill.custom_ops import (
    distill_output,
    fake_backward_outputs,
    fake_forward_outputs,
    fake_logprobs_outputs,
    logprobs_output,
    register_distill_autograd,
    register_logprobs_autograd,
)
from sdpo_fast.distill.formulas import TAIL_LOG_MASS_MAX, divergence, mixture_logp, topk_support
from sdpo_fast.distill.output import DistillOutput, LogProbOutput

# Elements of one [C, V] working block: C = max(1, DEFAULT_CHUNK_ELEMS // V) rows per chunk. About
# five such blocks are alive at once in backward: ~640 MB in float32 at this setting. Smaller blocks
# save memory but the LM-head GEMMs get slow on few rows (CPU, V=151936: 1 << 24 took 1.4x the time).
DEFAULT_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class _Options:
    alpha: float
    temperature: float
    topk: int | None
    add_tail: bool
    chunk_rows: int
    adv_clip: float | None = None


def _logp_block(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, dtype: torch.dtype, lse=None):
    """Log-softmax of one chunk's logits / temperature, in place; returns (logp, lse).

    Pass the saved `lse` to skip the reduction when recomputing in backward.
    """
    logits = (hidden @ weight.T).to(dtype)
    if temperature != 1.0:
        logits.mul_(1.0 / temperature)
    if lse is None:
        lse = logits.logsumexp(-1)
    return logits.sub_(lse.unsqueeze(-1)), lse


def _vecdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(x, y, dim=-1)


def _topk_divergence(logp_s_k: torch.Tensor, logp_t_k: torch.Tensor, opts: _Options) -> torch.Tensor:
    return divergence(*topk_support(logp_s_k, logp_t_k, opts.add_tail, opts.adv_clip), opts.alpha)


def _topk_divergence_grad(logp_s_k: torch.Tensor, logp_t_k: torch.Tensor, opts: _Options) -> torch.Tensor:
    """d(_topk_divergence)/d(logp_s_k) in closed form (backward runs inside a custom op, without autograd).

    With S, T the support distributions' log-probs and M = log((1 - alpha) e^S + alpha e^T):
    dD/dS = -e^T (alpha = 0), e^S (S - T + 1) (alpha = 1), (1 - alpha) e^S (S - M) (JSD); then the chain
    rule through the tail bucket log(1 - e^L), L = logsumexp(logp_s_k) (d tail / d s_j = -e^(s_j - tail),
    zero where L is clamped), or through the renormalisation S = s - L. With `adv_clip`, T is the clipped
    teacher (a constant; see `formulas.clip_teacher`).
    """
    s, t = topk_support(logp_s_k, logp_t_k, opts.add_tail, opts.adv_clip)
    p = s.exp()
    if opts.alpha == 0.0:
        g = t.exp().neg_()
    elif opts.alpha == 1.0:
        g = (s - t + 1.0).mul_(p)
    else:
        g = (s - mixture_logp(s, t, opts.alpha)).mul_(p).mul_(1.0 - opts.alpha)
    if not opts.add_tail:
        return g - p * g.sum(-1, keepdim=True)
    unclamped = logp_s_k.logsumexp(-1, keepdim=True) <= TAIL_LOG_MASS_MAX
    d_tail = torch.where(unclamped, (logp_s_k - s[..., -1:]).exp().neg_(), 0.0)
    return g[..., :-1] + g[..., -1:] * d_tail


def _forward_divergence(logp_s, logp_t, p, support, opts: _Options):
    """(divergence, KL term kept for backward) of one chunk."""
    if support is not None:
        return _topk_divergence(logp_s.gather(-1, support), logp_t.gather(-1, support), opts), None
    if opts.alpha == 0.0:
        return _vecdot(logp_t.exp(), logp_t - logp_s), None
    if opts.alpha == 1.0:
        kl = _vecdot(p, logp_s - logp_t)
        return kl, kl
    logp_m = mixture_logp(logp_s, logp_t, opts.alpha)
    kl_sm = _vecdot(p, logp_s - logp_m)
    kl_tm = _vecdot(logp_t.exp(), logp_t - logp_m)
    return (1.0 - opts.alpha) * kl_sm + opts.alpha * kl_tm, kl_sm


def _divergence_grad(logp_s, logp_t, p, kl, support, opts: _Options, grad_div: torch.Tensor) -> torch.Tensor:
    """grad_div * d(divergence)/d(student logits / temperature) of one chunk, in a fresh block (reuses logp_t).

    grad_div: [C, 1] upstream gradient; row scalars (it, 1 - alpha) are folded into one multiply.
    """
    if support is not None:  # d logp_s[j] / d logit[i] = delta_ij - p_i
        g_small = _topk_divergence_grad(logp_s.gather(-1, support), logp_t.gather(-1, support), opts) * grad_div
        return torch.zeros_like(p).scatter_(-1, support, g_small).sub_(p * g_small.sum(-1, keepdim=True))
    if opts.alpha == 0.0:  # p - q
        return logp_t.exp_().neg_().add_(p).mul_(grad_div)
    kl = kl.unsqueeze(-1)
    if opts.alpha == 1.0:  # p (log p - log q - KL(p||q))
        return logp_t.neg_().add_(logp_s).sub_(kl).mul_(p).mul_(grad_div)
    # (1 - alpha) p (log p - log M - KL(p||M))
    logp_m = mixture_logp(logp_s, logp_t, opts.alpha)
    return logp_m.neg_().add_(logp_s).sub_(kl).mul_(p).mul_(grad_div * (1.0 - opts.alpha))


@torch.library.custom_op("sdpo_fast::linear_distill_chunked", mutates_args=())
def _chunked_forward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    topk: Optional[int],
    add_tail: bool,
    ignore_index: int,
    chunk_rows: int,
    adv_clip: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward in the calling convention of `custom_ops`; saved = (per-row stats [3, N], top-k supports)."""
    opts = _Options(alpha, temperature, topk, add_tail, chunk_rows, adv_clip)
    n, device = student_hidden.shape[0], student_hidden.device
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    out = torch.zeros(5, n, dtype=dtype, device=device)
    # Per row: both log-normalisers and the KL term of the closed-form gradient (0 for ignored rows).
    saved = torch.zeros(3, n, dtype=dtype, device=device)
    supports = torch.zeros(n, topk or 0, dtype=torch.long, device=device)

    rows = (targets != ignore_index).nonzero().squeeze(-1)
    for start in range(0, rows.numel(), opts.chunk_rows):
        r = rows[start:start + opts.chunk_rows]
        logp_s, lse_s = _logp_block(student_hidden[r], weight, opts.temperature, dtype)
        logp_t, lse_t = _logp_block(teacher_hidden[r], teacher_weight, opts.temperature, dtype)
        p = logp_s.exp()
        support = None
        if topk is not None:
            supports[r] = support = logp_s.topk(topk, dim=-1).indices
        div, kl = _forward_divergence(logp_s, logp_t, p, support, opts)
        y = targets[r].unsqueeze(-1)
        s_y = logp_s.gather(-1, y).squeeze(-1)
        t_y = logp_t.gather(-1, y).squeeze(-1)
        out[:, r] = torch.stack([div, s_y, t_y, t_y - s_y, -_vecdot(p, logp_s)])
        saved[0, r], saved[1, r] = lse_s, lse_t
        if kl is not None:
            saved[2, r] = kl
    return out[0].clone(), out[1].clone(), out[2:].clone(), saved, supports


@_chunked_forward.register_fake
def _(student_hidden, teacher_hidden, weight, teacher_weight, targets, alpha, temperature, topk, add_tail,
      ignore_index, chunk_rows, adv_clip):
    return *fake_forward_outputs(student_hidden, targets), targets.new_empty(targets.shape[0], topk or 0)


@torch.library.custom_op("sdpo_fast::linear_distill_chunked_backward", mutates_args=())
def _chunked_backward(
    grad_div: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    saved: torch.Tensor,
    supports: torch.Tensor,
    alpha: float,
    temperature: float,
    topk: Optional[int],
    add_tail: bool,
    ignore_index: int,
    chunk_rows: int,
    adv_clip: Optional[float],
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward in the calling convention of `custom_ops`: recompute each chunk, closed-form gradient."""
    opts = _Options(alpha, temperature, topk, add_tail, chunk_rows, adv_clip)
    dtype = saved.dtype
    grad_h = torch.zeros_like(student_hidden, dtype=dtype) if need_h else student_hidden.new_empty(0)
    grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else weight.new_empty(0)

    rows = (targets != ignore_index).nonzero().squeeze(-1)
    for start in range(0, rows.numel(), opts.chunk_rows):
        r = rows[start:start + opts.chunk_rows]
        h = student_hidden[r]
        lse_s, lse_t, kl = saved[:, r]
        logp_s, _ = _logp_block(h, weight, opts.temperature, dtype, lse_s)
        p = logp_s.exp()
        if grad_div is not None:
            logp_t, _ = _logp_block(teacher_hidden[r], teacher_weight, opts.temperature, dtype, lse_t)
            support = supports[r] if topk is not None else None
            grad_logits = _divergence_grad(logp_s, logp_t, p, kl, support, opts, grad_div[r].to(dtype).unsqueeze(-1))
            del logp_t
        else:
            grad_logits = torch.zeros_like(p)
        if grad_logp is not None:
            _add_logp_grad(grad_logits, p, grad_logp[r], targets[r])
        del logp_s, p
        _apply_grad_logits(grad_logits, h, r, weight, grad_h if need_h else None, grad_w if need_w else None,
                           opts.temperature)
    return grad_h.to(student_hidden.dtype), grad_w.to(weight.dtype)


def _add_logp_grad(grad_logits: torch.Tensor, p: torch.Tensor, grad_logp: torch.Tensor, y: torch.Tensor) -> None:
    """grad_logits += grad_logp * d log p(y) / d logits = grad_logp * (onehot(y) - p), in place."""
    g = grad_logp.to(grad_logits.dtype).unsqueeze(-1)
    grad_logits.addcmul_(p, g, value=-1.0).scatter_add_(-1, y.unsqueeze(-1), g)


def _apply_grad_logits(grad_logits: torch.Tensor, h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                       grad_h: torch.Tensor | None, grad_w: torch.Tensor | None, temperature: float) -> None:
    """Chain one chunk's d(loss)/d(logits / temperature) through the LM head with two GEMMs.

    Writes grad_h[r] and adds to grad_w (float accumulators; None when that gradient is not needed).
    """
    if temperature != 1.0:
        grad_logits.mul_(1.0 / temperature)
    grad_logits = grad_logits.to(weight.dtype)
    if grad_h is not None:
        grad_h[r] = (grad_logits @ weight).to(grad_h.dtype)
    if grad_w is not None:  # in place: no [V, H] temporary per chunk
        if grad_logits.dtype == grad_w.dtype:
            grad_w.addmm_(grad_logits.T, h)
        else:
            grad_w += (grad_logits.T @ h).to(grad_w.dtype)


@_chunked_backward.register_fake
def _(grad_div, grad_logp, student_hidden, teacher_hidden, weight, teacher_weight, targets, saved, supports,
      alpha, temperature, topk, add_tail, ignore_index, chunk_rows, adv_clip, need_h, need_w):
    return fake_backward_outputs(student_hidden, weight, need_h, need_w)


register_distill_autograd(_chunked_forward, _chunked_backward)


def linear_distill_chunked(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    topk: int | None,
    add_tail: bool,
    ignore_index: int,
    adv_clip: float | None = None,
    chunk_elems: int | None = None,
) -> DistillOutput:
    """Bounded-memory `linear_distill` (see the module docstring); arguments as `linear_distill`.

    `chunk_elems` bounds one working block: rows per chunk = max(1, chunk_elems // V).
    """
    chunk_rows = max(1, (chunk_elems or DEFAULT_CHUNK_ELEMS) // weight.shape[0])
    return distill_output(*_chunked_forward(
        student_hidden, teacher_hidden.detach(), weight, teacher_weight.detach(), targets,
        float(alpha), float(temperature), topk, bool(add_tail), int(ignore_index), chunk_rows,
        None if adv_clip is None else float(adv_clip),
    ))


@torch.library.custom_op("sdpo_fast::linear_logprobs_chunked", mutates_args=())
def _chunked_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student-only forward in the calling convention of `custom_ops`; saved = log-normalisers [1, N]."""
    n, device = hidden.shape[0], hidden.device
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(2, n, dtype=dtype, device=device)
    lse = torch.zeros(1, n, dtype=dtype, device=device)
    rows = (targets != ignore_index).nonzero().squeeze(-1)
    for start in range(0, rows.numel(), chunk_rows):
        r = rows[start:start + chunk_rows]
        logp, lse[0, r] = _logp_block(hidden[r], weight, temperature, dtype)
        out[:, r] = torch.stack([logp.gather(-1, targets[r].unsqueeze(-1)).squeeze(-1), -_vecdot(logp.exp(), logp)])
    return out[0].clone(), out[1:].clone(), lse


@_chunked_logprobs_forward.register_fake
def _(hidden, weight, targets, temperature, ignore_index, chunk_rows):
    return fake_logprobs_outputs(hidden, targets)


@torch.library.custom_op("sdpo_fast::linear_logprobs_chunked_backward", mutates_args=())
def _chunked_logprobs_backward(
    grad_logp: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_rows: int,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-only backward: recompute each chunk's log-probs, gradient onehot(y) - p, two GEMMs."""
    dtype = lse.dtype
    grad_h = torch.zeros_like(hidden, dtype=dtype) if need_h else hidden.new_empty(0)
    grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else weight.new_empty(0)
    rows = (targets != ignore_index).nonzero().squeeze(-1)
    for start in range(0, rows.numel(), chunk_rows):
        r = rows[start:start + chunk_rows]
        h = hidden[r]
        logp, _ = _logp_block(h, weight, temperature, dtype, lse[0, r])
        # Renormalised: the saved lse is rounded, which would scale every p of a row by one factor (1 + eps|lse|),
        # and with large logits the gradient of a shared logit offset, sum(p) - 1, would no longer vanish.
        p = logp.exp_()
        p.div_(p.sum(-1, keepdim=True))
        grad_logits = torch.zeros_like(p)
        _add_logp_grad(grad_logits, p, grad_logp[r], targets[r])
        del logp, p
        _apply_grad_logits(grad_logits, h, r, weight, grad_h if need_h else None, grad_w if need_w else None,
                           temperature)
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype)


@_chunked_logprobs_backward.register_fake
def _(grad_logp, hidden, weight, targets, lse, temperature, ignore_index, chunk_rows, need_h, need_w):
    return fake_backward_outputs(hidden, weight, need_h, need_w)


register_logprobs_autograd(_chunked_logprobs_forward, _chunked_logprobs_backward)


def linear_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    chunk_elems: int | None = None,
) -> LogProbOutput:
    """Bounded-memory `linear_logprobs` (see the module docstring); arguments as `linear_logprobs`.

    `chunk_elems` bounds one working block: rows per chunk = max(1, chunk_elems // V).
    """
    chunk_rows = max(1, (chunk_elems or DEFAULT_CHUNK_ELEMS) // weight.shape[0])
    return logprobs_output(*_chunked_logprobs_forward(
        hidden, weight, targets, float(temperature), int(ignore_index), chunk_rows,
    ))
