"""CUDA backends of shared-prefix scoring (FlexAttention BlockMask, flash-attn varlen) against the unshared
padded batch. Skipped without a CUDA GPU (and, for flash, without the flash-attn package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdpo_fast.models import tiny_random_model
from sdpo_fast.scoring import PrefixKV, enable_prefix_attention, response_hidden_states
from tests.scoring.conftest import VOCAB, max_rel_err, mixed_batch, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_flash = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                                 reason="needs a CUDA GPU with the flash-attn package")


def cuda_model(attention: str, dtype: torch.dtype):
    model = tiny_random_model(VOCAB, arch="qwen3", tie_word_embeddings=False, head_dim=32).to("cuda", dtype)
    if attention == "prefix":
        enable_prefix_attention(model)
    else:
        model.set_attn_implementation(attention)
    return model


def values_and_grads(model, seqs, starts, weights, **kwargs):
    model.zero_grad(set_to_none=True)
    hidden = response_hidden_states(model, seqs, starts, **kwargs)
    sum((h.float() * w).sum() for h, w in zip(hidden, weights)).backward()
    return hidden, {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


# fp32 flex is compared tightly; bf16 flash against the bf16 padded batch (both round differently).
@pytest.mark.parametrize("attention,backend,dtype,tol", [
    ("flex_attention", "flex", torch.float32, 1e-4),
    ("prefix", "flex", torch.float32, 1e-4),
    pytest.param("prefix", "flash", torch.bfloat16, 3e-2, marks=needs_flash),
])
def test_cuda_backend_equals_unshared(attention, backend, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    model = cuda_model(attention, dtype)
    seqs, starts = mixed_batch(gen)
    weights = [torch.randn(len(s) - b, model.config.hidden_size, generator=gen).cuda() for s, b in zip(seqs, starts)]
    ref, ref_grads = values_and_grads(model, seqs, starts, weights, share_prefix=False)
    for budget in (10_000, 24):
        out, grads = values_and_grads(model, seqs, starts, weights, backend=backend, max_row_tokens=budget)
        assert max_rel_err([h.float() for h in out], [h.float() for h in ref]) < tol
        assert max(rel_err(grads[k], ref_grads[k]) for k in ref_grads) < tol
    store = PrefixKV()
    response_hidden_states(model, seqs, starts, backend=backend, record_prefix_kv=store)
    teacher = [s[:b] + [5, 6, 7] + s[b:] for s, b in zip(seqs, starts)]
    t_starts = [b + 3 for b in starts]
    with torch.no_grad():
        reused = response_hidden_states(model, teacher, t_starts, backend=backend, prefix_kv=store)
        scratch = response_hidden_states(model, teacher, t_starts, share_prefix=False)
    assert max_rel_err([h.float() for h in reused], [h.float() for h in scratch]) < tol
