"""sdpo_fast.integrations.hf: hidden states and LM heads of Hugging Face models for the fused ops.

Checked against the materialised-logits computation on tiny random models (values and gradients of every
parameter), the guards against models whose logits are not a plain linear head, and the FSDP2 recipe
(`call_with_head`) on 2 CPU ranks against the unsharded model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from sdpo_fast.integrations import call_with_head, completion_hidden, token_logprobs
from sdpo_fast.models import tiny_random_model
from tests.conftest import FORK_ONLY, run_two_ranks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

V, P, T = 211, 6, 7  # vocabulary, prompt and completion lengths


def make_batch(seed: int, batch: int = 3):
    """Left-padded prompts followed by right-padded completions, as TRL and verl lay them out."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, V, (batch, P), generator=g)
    completion = torch.randint(3, V, (batch, T), generator=g)
    prompt_mask = torch.ones(batch, P, dtype=torch.long)
    completion_mask = torch.ones(batch, T, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_mask[-1, 4:] = 0
    return (torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1), completion,
            completion_mask)


def logits_logprobs(model, input_ids, attention_mask, completion, completion_mask, temperature):
    """The materialised path: full logits, shifted by one, log-softmax, gather; 0 on padded positions."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = (logits[:, -T - 1:-1] / temperature).log_softmax(-1)
    token_logp = logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp * completion_mask, entropy * completion_mask


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_token_logprobs_equal_the_logits_path_with_gradients(tied):
    model = tiny_random_model(V, tie_word_embeddings=tied, seed=1)
    ids, mask, completion, completion_mask = make_batch(0)
    weights = torch.randn(completion.shape)

    out = token_logprobs(model, ids, mask, completion, completion_mask, temperature=0.8)
    fused = grads(model, (weights * out.logp).sum())
    want_logp, want_entropy = logits_logprobs(model, ids, mask, completion, completion_mask, 0.8)
    want = grads(model, (weights * want_logp).sum())

    torch.testing.assert_close(out.logp.detach(), want_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, want_entropy.detach(), atol=1e-5, rtol=1e-5)
    assert not out.entropy.requires_grad
    assert fused.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(fused[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_completion_hidden_positions_and_arguments():
    model = tiny_random_model(V, seed=2)
    ids, mask, *_ = make_batch(1)
    hidden = completion_hidden(model, ids, mask, T)
    full = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, full[:, -T - 1:-1])
    for bad in (0, ids.shape[1]):
        with pytest.raises(ValueError, match="num_tokens"):
            completion_hidden(model, ids, mask, bad)


def test_models_whose_logits_are_not_a_plain_head_are_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    ids, mask, completion, completion_mask = make_batch(2)
    config = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        token_logprobs(AutoModelForCausalLM.from_config(config), ids, mask, completion, completion_mask)

    class ScaledHead(nn.Linear):  # post-processing that no config field names
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = tiny_random_model(V, tie_word_embeddings=False, seed=3)
    head = ScaledHead(model.config.hidden_size, V, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    with pytest.raises(ValueError, match="logits are not"):
        token_logprobs(model, ids, mask, completion, completion_mask)

    model = tiny_random_model(V, tie_word_embeddings=False, seed=4)
    model.lm_head.bias = nn.Parameter(torch.zeros(V))
    with pytest.raises(ValueError, match="bias"):
        token_logprobs(model, ids, mask, completion, completion_mask)


# ---- FSDP2 on 2 CPU ranks (gloo) -----------------------------------------------------------------------

def _rank_loss(model, rank: int) -> torch.Tensor:
    """Each rank's share of a GRPO-style loss on its own batch."""
    ids, mask, completion, completion_mask = make_batch(10 + rank, batch=2)
    advantages = torch.linspace(-1.0, 1.0, 2).unsqueeze(1) * (rank + 1)
    out = token_logprobs(model, ids, mask, completion, completion_mask, temperature=0.9)
    return -(advantages * out.logp).sum() / completion_mask.sum()


def _fsdp_worker(rank: int, mesh: DeviceMesh, tied: bool) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = tiny_random_model(V, tie_word_embeddings=tied, seed=5)
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if not tied:  # a head of its own group is resharded after each forward: outside one, it is a DTensor
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root group: embeddings (and a tied head), final norm
    assert isinstance(model.lm_head.weight, DTensor)

    _rank_loss(model, rank).backward()
    # FSDP averages the ranks' gradients: the reference is the mean of both ranks' losses.
    (sum(_rank_loss(reference, r) for r in range(mesh.size())) / mesh.size()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-4, msg=name)


@FORK_ONLY
@pytest.mark.parametrize("tied", [True, False], ids=["tied-head-in-root-group", "head-in-own-group"])
def test_call_with_head_trains_an_fsdp2_sharded_head(tied):
    run_two_ranks(_fsdp_worker, tied)


def test_call_with_head_is_a_plain_call_without_fsdp():
    model = tiny_random_model(V, seed=6)
    assert call_with_head(model, lambda w, x: (w, x), 3) == (model.lm_head.weight, 3)
