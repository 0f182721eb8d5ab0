"""CPU timings of the algorithm layer's per-step host work (median of repeats, after a warm-up).

1. `build_teacher_contexts` for a reference-sized batch (32 prompts x 8 rollouts) with the SmolLM2
   tokenizer: the host-side cost SDPO adds to a step before any forward pass.
2. The EMA teacher update on a SmolLM2-135M-shaped parameter set: one fused foreach lerp (ours) vs a
   per-parameter mul_/add_ loop (the reference's form).

Run: .venv/bin/python benchmarks/bench_algorithm_cpu.py [--prompt-words 300] [--response-tokens 512]
"""

from __future__ import annotations

import argparse
import random

import torch
from torch import nn

from sdpo_fast.algorithm import build_teacher_contexts, ema_update
from sdpo_fast.bench.common import median_times
from sdpo_fast.models import load_tokenizer


def bench_reprompt(prompts: int, group: int, prompt_words: int, response_tokens: int, repeats: int) -> None:
    tok = load_tokenizer()
    rng = random.Random(0)
    vocab = len(tok)
    messages, responses, rewards, groups, feedback = [], [], [], [], []
    for p in range(prompts):
        question = " ".join(f"token{rng.randrange(1000)}" for _ in range(prompt_words))
        for _ in range(group):
            messages.append([{"role": "user", "content": question}])
            responses.append([rng.randrange(200, vocab) for _ in range(response_tokens)])
            rewards.append(float(rng.random() < 0.3))
            groups.append(p)
            feedback.append("Traceback: AssertionError in test_3" if rng.random() < 0.5 else None)
    ctx = build_teacher_contexts(tok, messages, responses, rewards, groups, feedback)
    (seconds,) = median_times([lambda: build_teacher_contexts(tok, messages, responses, rewards, groups, feedback)],
                              repeats=repeats)
    tokens = sum(len(ids) for ids in ctx.input_ids)
    print(f"build_teacher_contexts: {prompts}x{group} rollouts, {len(ctx.rows)} teacher rows, "
          f"{tokens} teacher tokens: {seconds * 1e3:.1f} ms median ({tokens / seconds / 1e6:.2f} M tokens/s)")


def smollm2_shaped_params(seed: int) -> nn.ParameterList:
    """Parameter shapes of SmolLM2-135M (30 layers, hidden 576, MLP 1536, 9/3 heads, vocab 49152)."""
    torch.manual_seed(seed)
    shapes = [(49152, 576)]
    for _ in range(30):
        shapes += [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536),
                   (576,), (576,)]
    shapes.append((576,))
    return nn.ParameterList([nn.Parameter(torch.randn(s) * 0.02, requires_grad=False) for s in shapes])


def bench_ema(repeats: int) -> None:
    teacher, student = smollm2_shaped_params(0), smollm2_shaped_params(1)
    count = sum(p.numel() for p in teacher)

    def loop():
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(1 - 0.05).add_(s, alpha=0.05)

    fused, plain = median_times([lambda: ema_update(teacher, student, 0.05), loop], repeats=repeats)
    print(f"EMA update, {count / 1e6:.0f}M fp32 params ({len(list(teacher.parameters()))} tensors): "
          f"foreach lerp {fused * 1e3:.1f} ms, per-parameter mul_/add_ {plain * 1e3:.1f} ms "
          f"(ratio {plain / fused:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_reprompt(args.prompts, args.group, args.prompt_words, args.response_tokens, args.repeats)
    bench_ema(args.repeats)


if __name__ == "__main__":
    main()
