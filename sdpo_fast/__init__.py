"""sdpo_fast: a fused-kernel training engine for Self-Distillation Policy Optimization (SDPO).

The public names below are imported lazily, on first use, so that light subpackages (e.g. the
environments, imported by every sandbox worker) do not pull in torch and transformers.
"""

from sdpo_fast.lazy import lazy_exports

_EXPORTS = {
    "sdpo_fast.distill": ("linear_distill", "DistillOutput", "linear_logprobs", "LogProbOutput"),
    "sdpo_fast.algorithm": ("build_teacher_contexts", "RepromptConfig", "TeacherContexts", "Teacher", "LossConfig",
                            "TokenBatch", "compute_loss", "grpo_advantages", "Aggregator"),
    "sdpo_fast.scoring": ("response_hidden_states", "PrefixKV"),
    "sdpo_fast.envs": ("BatchEvaluator", "CodeEnv", "Evaluation", "MathEnv", "evaluate_batch", "make_problems",
                       "task_env"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__version__ = "0.1.0"
