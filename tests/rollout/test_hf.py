"""Hugging Face generate backend: batching, EOS cut, truncation flags, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdpo_fast.models import tiny_random_model
from sdpo_fast.rollout import Rollouts, SamplingConfig, generate

EOS, PAD = 2, 0


class ScriptedLM(nn.Module):
    """Stands in for a causal LM: `generate` appends scripted continuations to the (left-padded) inputs."""

    def __init__(self, continuations):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.continuations = list(continuations)
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone(), kwargs))
        rows = [self.continuations.pop(0) for _ in range(input_ids.shape[0])]
        new = torch.tensor([(r + [PAD] * max_new_tokens)[:max_new_tokens] for r in rows])
        return torch.cat([input_ids, new], 1)


def test_responses_stop_after_first_eos_and_flag_truncation():
    lm = ScriptedLM([[5, 6, EOS, 7], [8, 9, 10, 11], [EOS], [3, EOS, EOS]])
    out = generate(lm, [[11, 12, 13], [14]], 2, SamplingConfig(max_new_tokens=4), eos_token_ids=[EOS],
                   pad_token_id=PAD, batch_size=3)
    assert out.responses == [[5, 6, EOS], [8, 9, 10, 11], [EOS], [3, EOS]]
    assert out.truncated == [False, True, False, False]
    assert [out.group(i) for i in range(4)] == [0, 0, 1, 1]
    assert out.sequences()[2] == [14, EOS]
    first_ids, first_mask, kwargs = lm.calls[0]
    assert first_ids.tolist() == [[11, 12, 13]] * 2 + [[PAD, PAD, 14]]  # left padded, batch of 3
    assert first_mask.tolist() == [[1, 1, 1]] * 2 + [[0, 0, 1]]
    assert kwargs["do_sample"] is True and len(lm.calls) == 2


def test_greedy_when_temperature_is_zero():
    lm = ScriptedLM([[EOS]])
    generate(lm, [[4]], 1, SamplingConfig(max_new_tokens=2, temperature=0.0), eos_token_ids=[EOS], pad_token_id=PAD)
    assert lm.calls[0][2]["do_sample"] is False and lm.calls[0][2]["temperature"] is None


def test_sampling_is_reproducible_under_a_seed_and_restores_train_mode():
    model = tiny_random_model(97, seed=1)
    model.train()
    prompts = [[5, 17, 33], [8, 9]]
    kw = dict(eos_token_ids=[EOS], pad_token_id=PAD)
    torch.manual_seed(0)
    a = generate(model, prompts, 3, SamplingConfig(max_new_tokens=6), **kw)
    torch.manual_seed(0)
    b = generate(model, prompts, 3, SamplingConfig(max_new_tokens=6), **kw)
    assert a.responses == b.responses and model.training
    assert all(1 <= len(r) <= 6 for r in a.responses)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
])
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_rollout_shapes():
    with pytest.raises(ValueError, match="responses"):
        Rollouts(prompts=[[1]], responses=[[2]], truncated=[False], n=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(ScriptedLM([]), [[]], 1, SamplingConfig(), eos_token_ids=[EOS], pad_token_id=PAD)
