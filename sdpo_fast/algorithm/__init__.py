"""The SDPO algorithm layer: teacher contexts, teacher modes, and GRPO-compatible losses.

Plain data in (messages, response token ids, rewards, feedback strings, group ids, per-token tensors),
so any trainer can use it; the fused op `linear_distill` supplies the per-token divergence and log-probs.
Names are imported on first use: the settings (`sdpo_fast.algorithm.config`) need no torch.
"""

from sdpo_fast.lazy import lazy_exports

_EXPORTS = {
    "sdpo_fast.algorithm.config": ("AGG_MODES", "LOSS_MODES", "LossConfig", "RepromptConfig"),
    "sdpo_fast.algorithm.aggregation": ("Aggregator",),
    "sdpo_fast.algorithm.losses": ("TokenBatch", "compute_loss", "grpo_advantages", "importance_weight",
                                   "kl_penalty", "ppo_clip_loss", "blend_advantages"),
    "sdpo_fast.algorithm.metrics": ("Metrics",),
    "sdpo_fast.algorithm.reprompt": ("TeacherContexts", "build_teacher_contexts", "select_demonstrations",
                                     "strip_thinking", "teacher_message"),
    "sdpo_fast.algorithm.teachers": ("TEACHER_MODES", "Teacher", "ema_update", "lm_head_weight"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
