"""The result types of `linear_distill` and `linear_logprobs`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DistillOutput(NamedTuple):
    """Per-token results, float32 (float64 when the inputs are float64); ignored rows hold 0.

    divergence:   student-vs-teacher divergence; differentiable w.r.t. student hidden and weight.
    student_logp: log p_S(y); differentiable (the policy-gradient term).
    teacher_logp: log p_T(y); detached.
    advantage:    teacher_logp - student_logp; detached.
    entropy:      entropy of the student's full-vocabulary distribution; detached.
    """

    divergence: torch.Tensor
    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    advantage: torch.Tensor
    entropy: torch.Tensor

    def reshape(self, *shape: int) -> "DistillOutput":
        """The same results with every field reshaped (used for leading batch dimensions)."""
        return DistillOutput(*(t.reshape(shape) for t in self))


class LogProbOutput(NamedTuple):
    """Per-token results of `linear_logprobs`, float32 (float64 for float64 inputs); ignored rows hold 0.

    logp:    log p(y) of the target token; differentiable w.r.t. hidden and weight.
    entropy: entropy of the full-vocabulary distribution; detached.
    """

    logp: torch.Tensor
    entropy: torch.Tensor

    def reshape(self, *shape: int) -> "LogProbOutput":
        """The same results with every field reshaped (used for leading batch dimensions)."""
        return LogProbOutput(*(t.reshape(shape) for t in self))
