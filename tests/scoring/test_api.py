"""response_hidden_states: shared-prefix scoring equals the plain padded batch (values and gradients)."""

from __future__ import annotations

import pytest
import torch

import sdpo_fast
from sdpo_fast.models import tiny_random_model
from sdpo_fast.scoring import enable_prefix_attention, response_hidden_states
from tests.scoring.conftest import VOCAB, max_rel_err, mixed_batch, rel_err, tokens

TOL = 1e-5  # relative, fp32

# (architecture, tied embeddings, attention set-up, backend)
CONFIGS = [
    ("llama", True, "sdpa", "dense"),
    ("qwen3", False, "sdpa", "dense"),
    ("qwen2", True, "eager", "dense"),
    ("llama", True, "prefix", "segments"),
    ("qwen3", False, "prefix", "segments"),
    ("qwen3", False, "prefix", "dense"),
]


def make_model(arch: str, tied: bool, attention: str = "sdpa"):
    model = tiny_random_model(VOCAB, arch=arch, tie_word_embeddings=tied)
    if attention == "eager":
        model.set_attn_implementation("eager")
    elif attention == "prefix":
        enable_prefix_attention(model)
    return model


def hidden_and_grads(model, seqs, starts, weights, **kwargs):
    """Hidden states and the parameter gradients of a fixed random linear loss on them."""
    model.zero_grad(set_to_none=True)
    hidden = response_hidden_states(model, seqs, starts, **kwargs)
    sum((h * w).sum() for h, w in zip(hidden, weights)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden, grads


@pytest.mark.parametrize("arch,tied,attention,backend", CONFIGS)
def test_shared_equals_unshared_values_and_gradients(arch, tied, attention, backend):
    gen = torch.Generator().manual_seed(1)
    model = make_model(arch, tied, attention)
    seqs, starts = mixed_batch(gen)
    weights = [torch.randn(len(s) - b, model.config.hidden_size, generator=gen) for s, b in zip(seqs, starts)]

    ref, ref_grads = hidden_and_grads(model, seqs, starts, weights, share_prefix=False)
    for budget in (10_000, 24):  # one row; split over rows (ancestor chains repeated)
        out, grads = hidden_and_grads(model, seqs, starts, weights, backend=backend, max_row_tokens=budget)
        assert [tuple(h.shape) for h in out] == [(len(s) - b, model.config.hidden_size) for s, b in zip(seqs, starts)]
        assert max_rel_err(out, ref) < TOL
        assert grads.keys() == ref_grads.keys()
        worst = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
        assert worst < TOL, worst
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert "lm_head.weight" not in grads  # hidden states only: the head is applied later, in the fused op


def test_hidden_states_are_final_norm_outputs_of_the_model():
    """Row j of sequence i is the model's last hidden state at position start - 1 + j (no LM head)."""
    gen = torch.Generator().manual_seed(2)
    model = make_model("llama", True)
    seq = tokens(gen, 15)
    with torch.no_grad():
        full = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
        (out,) = response_hidden_states(model, [seq], [9])
        logits = model(torch.tensor([seq])).logits[0]
    assert rel_err(out, full[8:14]) < TOL
    assert rel_err(out @ model.get_output_embeddings().weight.T, logits[8:14]) < TOL


def test_base_model_and_tensor_inputs_are_accepted():
    gen = torch.Generator().manual_seed(3)
    model = make_model("qwen3", False)
    seqs, starts = mixed_batch(gen)
    with torch.no_grad():
        ref = response_hidden_states(model, seqs, starts)
        out = response_hidden_states(model.model, [torch.tensor(s) for s in seqs], torch.tensor(starts))
    assert max_rel_err(out, ref) == 0.0
    assert sdpo_fast.response_hidden_states is response_hidden_states
    assert response_hidden_states(model, [], []) == []


def test_prefix_attention_is_plain_sdpa_for_ordinary_calls():
    """A model switched to PREFIX_ATTENTION gives the same padded-batch outputs as with SDPA."""
    gen = torch.Generator().manual_seed(4)
    model = make_model("llama", True)
    ids = torch.tensor([tokens(gen, 12), tokens(gen, 12)])
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        enable_prefix_attention(model)
        out = model(ids, attention_mask=mask).logits
    assert rel_err(out[mask.bool()], ref[mask.bool()]) == 0.0


@pytest.mark.parametrize("starts,match", [
    ([0], r"response_starts\[0\] = 0 must be >= 1"),
    ([6], r"response_starts\[0\] = 6 leaves an empty response"),
    ([9], r"response_starts\[0\] = 9 leaves an empty response"),
    ([-2], r"must be >= 1"),
    ([2.0], r"response_starts\[0\] must be an int"),
    ([2, 3], r"same length"),
])
def test_bad_starts_raise(starts, match):
    model = make_model("llama", True)
    with pytest.raises(ValueError, match=match):
        response_hidden_states(model, [[1, 2, 3, 4, 5, 6]], starts)


def test_bad_sequences_raise():
    model = make_model("llama", True)
    with pytest.raises(ValueError, match=r"sequences\[1\] has token ids outside \[0, 257\)"):
        response_hidden_states(model, [[1, 2, 3], [1, 257, 3]], [1, 1])
    with pytest.raises(ValueError, match=r"sequences\[0\] must be a 1-D sequence of int"):
        response_hidden_states(model, [[1.5, 2.0, 3.0]], [1])
    with pytest.raises(ValueError, match="max_row_tokens must be a positive int"):
        response_hidden_states(model, [[1, 2, 3]], [1], max_row_tokens=0)


def test_model_attention_without_packed_support_raises():
    model = make_model("llama", True)
    model.config._attn_implementation = "flash_attention_2"  # as loaded; flash-attn itself is not needed here
    with pytest.raises(ValueError, match="'flash_attention_2' cannot take a packed prefix mask"):
        response_hidden_states(model, [[1, 2, 3]], [1])
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="backend='segments' cannot run on a model with attention implementation"):
        response_hidden_states(model, [[1, 2, 3]], [1], backend="segments")
    with pytest.raises(ValueError, match="backend must be one of"):
        response_hidden_states(model, [[1, 2, 3]], [1], backend="fast")
    # The unshared reference needs no packed mask.
    assert len(response_hidden_states(model, [[1, 2, 3]], [1], share_prefix=False)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a CPU-only machine")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_backends_raise_on_cpu(backend):
    model = make_model("llama", True, "prefix")
    with pytest.raises(ValueError, match=f"backend='{backend}' is unavailable: it needs a CUDA device"):
        response_hidden_states(model, [[1, 2, 3]], [1], backend=backend)


def test_sliding_window_layers_raise():
    model = tiny_random_model(VOCAB, arch="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="full-attention layers only"):
        response_hidden_states(model, [[1, 2, 3, 4, 5, 6, 7]], [2])
