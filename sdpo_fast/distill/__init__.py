"""The fused ops: LM head + student-vs-teacher divergence + token log-probs (`linear_distill`), or the
student's token log-probs and entropy alone (`linear_logprobs`), without logits."""

from sdpo_fast.distill.api import IGNORE_INDEX, linear_distill, linear_logprobs
from sdpo_fast.distill.output import DistillOutput, LogProbOutput

__all__ = ["IGNORE_INDEX", "linear_distill", "DistillOutput", "linear_logprobs", "LogProbOutput"]
