"""Rollouts with Hugging Face `generate`: the embedded backend (CPU and GPU, no extra packages)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from sdpo_fast.rollout.sampling import SamplingConfig  # noqa: F401  (re-exported)
from sdpo_fast.rollout.types import Rollouts


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    n: int,
    sampling: SamplingConfig,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int = 64,
) -> Rollouts:
    """Sample `n` responses for every prompt (token ids), in batches of at most `batch_size` sequences.

    A response ends at its first EOS token (kept, so the policy learns to stop) or after
    `max_new_tokens` (then marked truncated). Rollout i belongs to prompt i // n.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be non-empty token-id lists")
    eos = set(eos_token_ids)
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(n)]
    responses: list[list[int]] = []
    truncated: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(flat), batch_size):
            batch = flat[start:start + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):  # left padding: every prompt ends at the same column
                input_ids[row, width - len(p):] = torch.tensor(p)
                attention_mask[row, width - len(p):] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                top_k=None,
                eos_token_id=list(eos),
                pad_token_id=pad_token_id,
            )
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
                responses.append(row[:cut] if cut is not None else row)
                truncated.append(cut is None)
    finally:
        model.train(was_training)
    return Rollouts(prompts=[list(p) for p in prompts], responses=responses, truncated=truncated, n=n)
