"""Rollout backends: Hugging Face generate (embedded default) and vLLM (colocated, GPU; optional extra).

Names are imported on first use, so configurations can import `SamplingConfig` without torch."""

from sdpo_fast.lazy import lazy_exports

_EXPORTS = {
    "sdpo_fast.rollout.sampling": ("SamplingConfig",),
    "sdpo_fast.rollout.hf": ("generate",),
    "sdpo_fast.rollout.types": ("Rollouts",),
    "sdpo_fast.rollout.vllm_backend": ("VLLMRollout", "require_vllm"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
