"""Divergences on log-probability vectors, shared by every implementation of `linear_distill`.

All functions reduce over the last dimension and work in whatever float dtype they are given, so the
float64 reference, the bf16 baseline and the chunked implementation share one definition.
"""

from __future__ import annotations

import math

import torch

# The reference clamps log(sum of top-k probabilities) to at most this before taking the tail
# log(1 - sum): it keeps the tail finite (>= about -16.1) when the top-k hold all the mass.
TAIL_LOG_MASS_MAX = -1e-7


def divergence(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student-vs-teacher divergence per row.

    alpha = 0: KL(teacher || student) (forward KL); alpha = 1: KL(student || teacher) (reverse KL);
    otherwise the generalized Jensen-Shannon divergence with mixture M = (1 - alpha) p_S + alpha p_T:
    (1 - alpha) KL(p_S || M) + alpha KL(p_T || M).
    """
    if alpha == 0.0:
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if alpha == 1.0:
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    logp_m = mixture_logp(logp_s, logp_t, alpha)
    kl_s = (logp_s.exp() * (logp_s - logp_m)).sum(-1)
    kl_t = (logp_t.exp() * (logp_t - logp_m)).sum(-1)
    return (1.0 - alpha) * kl_s + alpha * kl_t


def mixture_logp(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """log((1 - alpha) p_S + alpha p_T), computed in log space for 0 < alpha < 1.

    As log(1 - alpha) + logaddexp(log p_S, log p_T + log(alpha / (1 - alpha))): one temporary fewer
    than shifting both sides (this runs on [chunk, V] blocks).
    """
    return torch.logaddexp(logp_s, logp_t + (math.log(alpha) - math.log1p(-alpha))).add_(math.log1p(-alpha))


def topk_support(
    logp_s_k: torch.Tensor, logp_t_k: torch.Tensor, add_tail: bool, adv_clip: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distributions on the student's top-k support from full-vocabulary log-probs gathered there.

    With `add_tail`, one bucket log(1 - sum_k p) is appended on each side (k + 1 entries);
    without it, both sides are renormalised over the k tokens. With `adv_clip`, the teacher side is
    `clip_teacher`'s (for the reverse KL only).
    """
    if add_tail:
        s, t = _with_tail(logp_s_k), _with_tail(logp_t_k)
    else:
        s = logp_s_k - logp_s_k.logsumexp(-1, keepdim=True)
        t = logp_t_k - logp_t_k.logsumexp(-1, keepdim=True)
    return s, clip_teacher(s, t, adv_clip)


def clip_teacher(s: torch.Tensor, t: torch.Tensor, adv_clip: float | None) -> torch.Tensor:
    """Advantage clipping: teacher log-probs moved to within `adv_clip` of the student's (held constant).

    SDPO's reverse-KL gradient is a policy gradient, sum_j p_j (s_j - t_j) grad s_j, with one advantage
    per support token, A_j = t_j - s_j. With t' = stopgrad(s + clamp(t - s, -c, c)) in place of t, the
    divergence sum_j p_j (s_j - t'_j) has the same gradient with A_j clamped to [-c, c]. None: t itself.
    """
    if adv_clip is None:
        return t
    s = s.detach()
    return s + (t - s).clamp(-adv_clip, adv_clip)


def _with_tail(logp_k: torch.Tensor) -> torch.Tensor:
    log_mass = logp_k.logsumexp(-1, keepdim=True).clamp(max=TAIL_LOG_MASS_MAX)
    return torch.cat([logp_k, torch.log(-torch.expm1(log_mass))], dim=-1)
