"""impl="naive": the readable specification of `linear_distill` and `linear_logprobs`.

It materialises [N, V] logits and lets autograd do the backward. It computes in the inputs' dtype,
so float64 inputs give the reference the tests compare against and bf16 inputs give the plain-torch
bf16 baseline.
"""

from __future__ import annotations

import torch

from sdpo_fast.distill.formulas import divergence, topk_support
from sdpo_fast.distill.output import DistillOutput, LogProbOutput


def linear_distill_naive(
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
) -> DistillOutput:
    """Divergence, token log-probs, advantage and entropy from full logits (see `linear_distill`)."""
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0).unsqueeze(-1)

    student_logits = (student_hidden @ weight.T) / temperature
    teacher_logits = (teacher_hidden.detach() @ teacher_weight.detach().T) / temperature
    logp_s = student_logits.log_softmax(-1)
    logp_t = teacher_logits.log_softmax(-1)

    if topk is None:
        div = divergence(logp_s, logp_t, alpha)
    else:
        support = student_logits.detach().topk(topk, dim=-1).indices
        div = divergence(*topk_support(logp_s.gather(-1, support), logp_t.gather(-1, support), add_tail,
                                       adv_clip), alpha)

    student_logp = logp_s.gather(-1, y).squeeze(-1)
    teacher_logp = logp_t.gather(-1, y).squeeze(-1)
    entropy = -(logp_s.exp() * logp_s).sum(-1)

    finish = _finisher(valid, student_hidden)
    return DistillOutput(
        divergence=finish(div),
        student_logp=finish(student_logp),
        teacher_logp=finish(teacher_logp).detach(),
        advantage=finish(teacher_logp - student_logp).detach(),
        entropy=finish(entropy).detach(),
    )


def linear_logprobs_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
) -> LogProbOutput:
    """Token log-probs and entropy from full logits (see `linear_logprobs`)."""
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0).unsqueeze(-1)
    logp = ((hidden @ weight.T) / temperature).log_softmax(-1)
    finish = _finisher(valid, hidden)
    return LogProbOutput(
        logp=finish(logp.gather(-1, y).squeeze(-1)),
        entropy=finish(-(logp.exp() * logp).sum(-1)).detach(),
    )


def _finisher(valid: torch.Tensor, hidden: torch.Tensor):
    """Cast a per-token result to the output dtype (float32, or float64) and zero the ignored rows."""
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    zero = hidden.new_zeros((), dtype=out_dtype)

    def finish(t: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, t.to(out_dtype), zero)

    return finish
