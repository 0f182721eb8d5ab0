"""sdpo_fast: a fused-kernel training engine for Self-Distillation Policy Optimization (SDPO).

The public names below are imported lazily, on first use, so that light subpackages (e.g. the
environments, imported by every sandbox worker) do not pull in torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "sdpo_fast.distill": ("linear_distill", "DistillOutput", "linear_logprobs", "LogProbOutput"),
    "sdpo_fast.algorithm": ("build_teacher_contexts", "RepromptConfig", "TeacherContexts", "Teacher", "LossConfig",
                            "TokenBatch", "compute_loss", "grpo_advantages", "Aggregator"),
    "sdpo_fast.scoring": ("response_hidden_states", "PrefixKV"),
    "sdpo_fast.envs": ("BatchEvaluator", "CodeEnv", "Evaluation", "MathEnv", "evaluate_batch", "make_problems",
                       "task_env"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sdpo_fast' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
