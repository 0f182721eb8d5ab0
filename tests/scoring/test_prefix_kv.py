"""Live-teacher reuse: the teacher pass continues from the prompt keys/values recorded in the student pass."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.models import tiny_random_model
from sdpo_fast.scoring import PrefixKV, enable_prefix_attention, response_hidden_states
from tests.scoring.conftest import VOCAB, max_rel_err, rel_err, tokens

TOL = 1e-5


def student_and_teacher(gen: torch.Generator):
    """Two prompt groups; teacher contexts = [the prompt | a per-group demonstration | an instruction]."""
    prompts = [tokens(gen, 15), tokens(gen, 9)]
    instruction = tokens(gen, 3)
    student, s_starts, teacher, t_starts = [], [], [], []
    for g, prompt in enumerate(prompts):
        demo = tokens(gen, 4 + g)
        for length in (6, 2, 9):
            response = tokens(gen, length)
            student.append(prompt + response)
            s_starts.append(len(prompt))
            context = prompt + demo + instruction
            teacher.append(context + response)
            t_starts.append(len(context))
    # a teacher sequence identical to a student one (the context is the prompt: reuse stops at start - 1)
    teacher.append(student[0])
    t_starts.append(s_starts[0])
    # a teacher context sharing only part of the prompt, and one sharing nothing
    teacher.append(prompts[0][:6] + tokens(gen, 5) + tokens(gen, 4))
    t_starts.append(11)
    teacher.append(tokens(gen, 7) + tokens(gen, 3))
    t_starts.append(7)
    return student, s_starts, teacher, t_starts


@pytest.mark.parametrize("arch,tied,attention,backend", [
    ("llama", True, "sdpa", "dense"),
    ("qwen3", False, "prefix", "segments"),
])
@pytest.mark.parametrize("budget", [10_000, 20])
def test_teacher_from_recorded_prompts_equals_scratch(arch, tied, attention, backend, budget):
    gen = torch.Generator().manual_seed(0)
    model = tiny_random_model(VOCAB, arch=arch, tie_word_embeddings=tied)
    if attention == "prefix":
        enable_prefix_attention(model)
    student, s_starts, teacher, t_starts = student_and_teacher(gen)
    store = PrefixKV()
    hidden = response_hidden_states(model, student, s_starts, backend=backend, max_row_tokens=budget,
                                    record_prefix_kv=store)
    assert hidden[0].requires_grad
    assert store.num_tokens == 15 + 9  # each distinct prompt once
    assert store.keys[0].shape == (24, model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim)
    with torch.no_grad():
        reused = response_hidden_states(model, teacher, t_starts, backend=backend, max_row_tokens=budget,
                                        prefix_kv=store)
        scratch = response_hidden_states(model, teacher, t_starts, share_prefix=False)
    assert max_rel_err(reused, scratch) < TOL


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no-grad teacher pass
@pytest.mark.parametrize("reentrant", [False, True])
def test_recording_and_reuse_under_gradient_checkpointing(reentrant):
    """Hugging Face drops past_key_values in checkpointed layers; recording and reuse must still work, and the
    student gradients (recomputed in backward) must stay exact."""
    gen = torch.Generator().manual_seed(1)
    model = tiny_random_model(VOCAB, arch="llama")
    student, s_starts, teacher, t_starts = student_and_teacher(gen)
    weights = [torch.randn(len(s) - b, model.config.hidden_size, generator=gen) for s, b in zip(student, s_starts)]

    def grads(**kwargs):
        model.zero_grad(set_to_none=True)
        hidden = response_hidden_states(model, student, s_starts, **kwargs)
        sum((h * w).sum() for h, w in zip(hidden, weights)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = grads(share_prefix=False)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    model.train()
    store = PrefixKV()
    out = grads(record_prefix_kv=store)
    assert max(rel_err(out[k], ref[k]) for k in ref) < TOL
    with torch.no_grad():
        reused = response_hidden_states(model, teacher, t_starts, prefix_kv=store)
        model.activation_checkpointing_disable()
        scratch = response_hidden_states(model, teacher, t_starts, share_prefix=False)
    assert max_rel_err(reused, scratch) < TOL
    assert all("_can_checkpoint_with_cache" not in layer.__dict__ for layer in model.model.layers)


def test_reuse_errors():
    gen = torch.Generator().manual_seed(2)
    model = tiny_random_model(VOCAB, arch="llama")
    other = tiny_random_model(VOCAB, arch="llama", seed=1)
    seqs, starts = [tokens(gen, 12)], [8]
    store = PrefixKV()
    with torch.no_grad(), pytest.raises(ValueError, match="prefix_kv is empty"):
        response_hidden_states(model, seqs, starts, prefix_kv=store)
    response_hidden_states(model, seqs, starts, record_prefix_kv=store)
    with pytest.raises(ValueError, match="call under torch.no_grad"):
        response_hidden_states(model, seqs, starts, prefix_kv=store)
    with torch.no_grad():
        with pytest.raises(ValueError, match="recorded with another model"):
            response_hidden_states(other, seqs, starts, prefix_kv=store)
        response_hidden_states(model, seqs, starts, prefix_kv=store)  # still valid
        model.model.norm.weight.mul_(1.5)  # e.g. an optimizer step
        with pytest.raises(ValueError, match="stale"):
            response_hidden_states(model, seqs, starts, prefix_kv=store)
    with pytest.raises(ValueError, match="not both"):
        response_hidden_states(model, seqs, starts, record_prefix_kv=store, prefix_kv=store)
    with pytest.raises(ValueError, match="need share_prefix=True"):
        response_hidden_states(model, seqs, starts, share_prefix=False, record_prefix_kv=store)
