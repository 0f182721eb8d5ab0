"""Measurements of shared-prefix scoring: tokens processed and median time, shared vs unshared.

G rollouts of one prompt. Student: hidden states with forward + backward on [prompt | y_i]. Teacher (no
grad): [prompt | demonstration | instruction | y_i], the teacher context shared by all G failed rollouts;
scored unshared, shared, and shared continuing from the prompt keys/values recorded in the student pass
(live teacher), each shared variant with every backend asked for. Variants run interleaved in one process
(warm-up, then the median of the repeats), so their ratios are comparable on a noisy machine.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sdpo_fast.bench.common import median_times
from sdpo_fast.models import tiny_random_model
from sdpo_fast.scoring import PrefixKV, enable_prefix_attention, response_hidden_states
from sdpo_fast.scoring.packing import pack_forest
from sdpo_fast.scoring.trie import build_forest

STUDENT, TEACHER = "student fwd+bwd", "teacher no-grad"


def scoring_model(hidden: int = 256, layers: int = 4, device: str = "cpu") -> torch.nn.Module:
    """A fp32 llama of `layers` x `hidden` (vocabulary 4096) set up for every shared-prefix backend."""
    model = tiny_random_model(4096, arch="llama", hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2).to(device)
    enable_prefix_attention(model)  # SDPA for plain calls; lets the shared runs pick any backend
    return model


def packed_tokens(seqs: list[list[int]], starts: list[int], share: bool, max_row_tokens: int,
                  store: PrefixKV | None = None) -> int:
    """Token positions the forward computes (padding included), as `response_hidden_states` lays them out."""
    inputs = [np.asarray(s[:-1]) for s in seqs]
    if not share:
        return len(inputs) * max(len(x) for x in inputs)
    anchors = [store.match(x, start - 1) for x, start in zip(inputs, starts)] if store else None
    positions = {a: store.offsets[a[0]] + np.arange(a[1]) for a in set(anchors) if a} if store else None
    rows = pack_forest(build_forest(inputs, anchors), inputs, max_row_tokens, positions)
    return int(np.prod(rows.shape))


def scoring_variants(model, prompt: int, response: int, *, g: int, demo: int, backends: list[str],
                     max_row_tokens: int) -> dict[tuple[str, str], tuple[Callable[[], None], int]]:
    """{(task, variant): (function running it once, tokens it processes)} for one PROMPTxRESPONSE shape."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(prompt * 7919 + response)
    vocab = model.config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    p, demonstration, instruction = tokens(prompt), tokens(demo), tokens(16)
    responses = [tokens(response) for _ in range(g)]
    student = [p + y for y in responses]
    s_starts = [prompt] * g
    context = p + demonstration + instruction
    teacher = [context + y for y in responses]
    t_starts = [len(context)] * g
    weights = torch.randn(g * response, model.config.hidden_size, generator=gen).to(device)
    store = PrefixKV()

    def student_pass(share: bool, backend: str = "auto", record: bool = False):
        def run():
            model.zero_grad(set_to_none=True)
            hidden = response_hidden_states(model, student, s_starts, share_prefix=share, backend=backend,
                                            max_row_tokens=max_row_tokens, record_prefix_kv=store if record else None)
            (torch.cat(hidden) * weights).sum().backward()
        return run

    def teacher_pass(share: bool, backend: str = "auto", reuse: bool = False):
        def run():
            with torch.no_grad():
                response_hidden_states(model, teacher, t_starts, share_prefix=share, backend=backend,
                                       max_row_tokens=max_row_tokens, prefix_kv=store if reuse else None)
        return run

    student_pass(True, record=True)()  # fills the store for the live-teacher variants
    s_shared = packed_tokens(student, s_starts, True, max_row_tokens)
    t_shared = packed_tokens(teacher, t_starts, True, max_row_tokens)
    t_reuse = packed_tokens(teacher, t_starts, True, max_row_tokens, store)
    variants = {
        (STUDENT, "unshared"): (student_pass(False), packed_tokens(student, s_starts, False, max_row_tokens)),
        (TEACHER, "unshared"): (teacher_pass(False), packed_tokens(teacher, t_starts, False, max_row_tokens)),
    }
    for backend in backends:
        variants[(STUDENT, f"shared {backend}")] = (student_pass(True, backend), s_shared)
        variants[(TEACHER, f"shared {backend}")] = (teacher_pass(True, backend), t_shared)
        variants[(TEACHER, f"shared {backend} +KV")] = (teacher_pass(True, backend, reuse=True), t_reuse)
    return variants


def run_shape(model, prompt: int, response: int, *, g: int = 8, demo: int = 128, backends: list[str],
              max_row_tokens: int, warmup: int = 2, repeats: int = 7) -> list[dict]:
    """Rows {prompt, response, task, variant, tokens, ms, token_ratio, speedup} (ratios vs unshared)."""
    variants = scoring_variants(model, prompt, response, g=g, demo=demo, backends=backends,
                                max_row_tokens=max_row_tokens)
    keys = list(variants)
    seconds = dict(zip(keys, median_times([variants[k][0] for k in keys], warmup, repeats,
                                                     device=next(model.parameters()).device)))
    rows = []
    for task, variant in sorted(keys, key=lambda k: k[0], reverse=True):
        ref_tokens, ref_s = variants[(task, "unshared")][1], seconds[(task, "unshared")]
        n_tokens, s = variants[(task, variant)][1], seconds[(task, variant)]
        rows.append({"prompt": prompt, "response": response, "task": task, "variant": variant, "tokens": n_tokens,
                     "ms": 1e3 * s, "token_ratio": ref_tokens / n_tokens, "speedup": ref_s / s})
    return rows
