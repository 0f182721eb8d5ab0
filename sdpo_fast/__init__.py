"""sdpo_fast: a fused-kernel training engine for Self-Distillation Policy Optimization (SDPO)."""

from sdpo_fast.algorithm import (
    Aggregator,
    LossConfig,
    RepromptConfig,
    Teacher,
    TeacherContexts,
    TokenBatch,
    build_teacher_contexts,
    compute_loss,
    grpo_advantages,
)
from sdpo_fast.distill import DistillOutput, LogProbOutput, linear_distill, linear_logprobs
from sdpo_fast.envs import BatchEvaluator, CodeEnv, Evaluation, MathEnv, evaluate_batch, make_problems, task_env
from sdpo_fast.scoring import PrefixKV, response_hidden_states

__all__ = [
    "linear_distill", "DistillOutput", "linear_logprobs", "LogProbOutput",
    "build_teacher_contexts", "RepromptConfig", "TeacherContexts", "Teacher", "LossConfig", "TokenBatch",
    "compute_loss", "grpo_advantages", "Aggregator",
    "response_hidden_states", "PrefixKV",
    "BatchEvaluator", "CodeEnv", "Evaluation", "MathEnv", "evaluate_batch", "make_problems", "task_env",
]
__version__ = "0.1.0"
