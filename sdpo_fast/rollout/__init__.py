"""Rollout backends: Hugging Face generate (embedded default) and vLLM (colocated, GPU; optional extra)."""

from sdpo_fast.rollout.hf import SamplingConfig, generate
from sdpo_fast.rollout.types import Rollouts
from sdpo_fast.rollout.vllm_backend import VLLMRollout, require_vllm

__all__ = ["Rollouts", "SamplingConfig", "VLLMRollout", "generate", "require_vllm"]
