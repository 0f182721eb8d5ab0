"""Measurements of the algorithm layer's per-step work outside the model.

- `build_teacher_contexts` for a batch of failed and successful rollouts with the SmolLM2 tokenizer: the
  host-side cost SDPO adds to a step before any forward pass.
- The EMA teacher update on a SmolLM2-135M-shaped parameter set on the device: one fused foreach lerp
  (`ema_update`) against a per-parameter mul_/add_ loop.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from sdpo_fast.bench.common import median_times

EMA_RATE = 0.05
PROMPT_WORDS, RESPONSE_TOKENS = 300, 512  # about 1.6k-token prompts, as in the reference's batches


def teacher_contexts_row(prompts: int, group: int, warmup: int, repeats: int) -> dict:
    """Median time of `build_teacher_contexts` on a synthetic batch (30% successes, half the failures with
    feedback), with the teacher rows and tokens it builds."""
    from sdpo_fast.algorithm import build_teacher_contexts
    from sdpo_fast.models import load_tokenizer

    tok = load_tokenizer()
    rng = random.Random(0)
    messages, responses, rewards, groups, feedback = [], [], [], [], []
    for p in range(prompts):
        question = " ".join(f"token{rng.randrange(1000)}" for _ in range(PROMPT_WORDS))
        for _ in range(group):
            messages.append([{"role": "user", "content": question}])
            responses.append([rng.randrange(200, len(tok)) for _ in range(RESPONSE_TOKENS)])
            rewards.append(float(rng.random() < 0.3))
            groups.append(p)
            feedback.append("Traceback: AssertionError in test_3" if rng.random() < 0.5 else None)

    def build():
        return build_teacher_contexts(tok, messages, responses, rewards, groups, feedback)

    ctx = build()
    (seconds,) = median_times([build], warmup, repeats)
    tokens = sum(len(ids) for ids in ctx.input_ids)
    return {"case": "build_teacher_contexts", "ms": 1e3 * seconds, "rollouts": prompts * group,
            "teacher_rows": len(ctx.rows), "teacher_tokens": tokens, "tokens_per_s": tokens / seconds}


def smollm2_shaped_params(seed: int, device: str) -> nn.ParameterList:
    """Parameter shapes of SmolLM2-135M (30 layers, hidden 576, MLP 1536, 9/3 heads, vocab 49152), fp32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(49152, 576)]
    for _ in range(30):
        shapes += [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536),
                   (576,), (576,)]
    shapes.append((576,))
    return nn.ParameterList([nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device), requires_grad=False)
                             for s in shapes])


def ema_rows(device: str, warmup: int, repeats: int) -> list[dict]:
    """Median time of one EMA teacher update, foreach lerp against a per-parameter loop (interleaved)."""
    from sdpo_fast.algorithm import ema_update

    teacher, student = smollm2_shaped_params(0, device), smollm2_shaped_params(1, device)
    params = sum(p.numel() for p in teacher)
    tensors = len(list(teacher.parameters()))

    def loop():
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(1 - EMA_RATE).add_(s, alpha=EMA_RATE)

    fused, plain = median_times([lambda: ema_update(teacher, student, EMA_RATE), loop], warmup, repeats, device=device)
    info = {"params": params, "tensors": tensors}
    return [{"case": "ema foreach lerp", "ms": 1e3 * fused, **info, "vs_foreach": 1.0},
            {"case": "ema per-parameter mul_/add_", "ms": 1e3 * plain, **info, "vs_foreach": plain / fused}]
