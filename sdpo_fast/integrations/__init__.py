"""The fused ops inside other trainers: TRL (`sdpo_fast.integrations.trl`, needs `pip install
'sdpo-fast[trl]'`), verl-style actors and plain PyTorch loops (`sdpo_fast.integrations.hf`).
See docs/integrations.md."""

from sdpo_fast.integrations.hf import call_with_head, completion_hidden, gathered, head_weight, token_logprobs

__all__ = ["call_with_head", "completion_hidden", "gathered", "head_weight", "token_logprobs"]
