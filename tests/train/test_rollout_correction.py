"""Rollout log-probs (vLLM's) reach the trainer's loss as old_logp: the loss equals the hand-computed
importance-weighted loss, for SDPO (truncated weight) and GRPO (clipped ratio)."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast.cli import parse
from sdpo_fast.train.config import TrainConfig

ARGS = ["--model", "tiny-random", "--task", "arithmetic", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
        "--micro-batch-size", "3", "--env-workers", "1", "--eval.problems", "1", "--sampling.temperature", "0.8"]
LENGTHS = (5, 3, 6, 4)  # rollouts 0, 1 answer prompt 0; rollouts 2, 3 prompt 1


def make_trainer(tmp_path, algorithm: str):
    from sdpo_fast.train.evaluate import prompt_ids
    from sdpo_fast.train.trainer import Trainer

    trainer = Trainer(parse(TrainConfig, [*ARGS, "--algorithm", algorithm, "--output-dir", str(tmp_path)], prog="t"))
    trainer.evaluator.close()
    messages = [trainer.task.messages(p) for p in trainer.task.batch(1, 2, 0)]
    prompts = [prompt_ids(trainer.tokenizer, m) for m in messages]
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(300, 40000, (n,), generator=gen).tolist() for n in LENGTHS]
    return trainer, messages, prompts, responses


def trainer_logp(trainer, prompts, responses) -> list[torch.Tensor]:
    """The policy's own log-probs of each response (what an exact sampler would report)."""
    out = []
    with torch.no_grad():
        for i, y in enumerate(responses):
            p = prompts[i // 2]
            res = trainer.policy([p + y], [len(p)], torch.tensor([y]), None, {"temperature": 0.8})
            out.append(res.logp[0])
    return out


def loss_of(trainer, messages, prompts, responses, rewards, old):
    trainer.optimizer.zero_grad(set_to_none=True)
    from sdpo_fast.rollout import Rollouts

    feedback = ["Wrong answer."] * len(responses)
    rollouts = Rollouts(prompts, responses, [False] * len(responses), 2, logprobs=old)
    return trainer._score_and_backward(messages, rollouts, rewards, feedback)


def test_sdpo_loss_is_weighted_by_the_truncated_importance_weight(tmp_path):
    trainer, messages, prompts, responses = make_trainer(tmp_path, "sdpo")
    logp = trainer_logp(trainer, prompts, responses)
    rewards = [0.0] * 4
    _, base = loss_of(trainer, messages, prompts, responses, rewards, None)
    assert base > 0
    metrics, shifted = loss_of(trainer, messages, prompts, responses, rewards, [lp - 0.5 for lp in logp])
    # w = min(p_trainer / p_rollout, 2) = e^0.5 on every token: the token-mean divergence scales by it
    assert shifted == pytest.approx(base * math.exp(0.5), rel=1e-4)
    assert metrics["rollout/logp_abs_diff/mean"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["loss/is_weight/mean"] == pytest.approx(math.exp(0.5), rel=1e-4)
    _, capped = loss_of(trainer, messages, prompts, responses, rewards, [lp - 1.5 for lp in logp])
    assert capped == pytest.approx(base * 2.0, rel=1e-4)  # e^1.5 truncated at loss.is_clip = 2
    with pytest.raises(ValueError, match="rollout log-probs of response 1"):
        loss_of(trainer, messages, prompts, responses, rewards, [logp[0], logp[1][:-1], logp[2], logp[3]])


def test_grpo_loss_uses_rollout_logprobs_in_its_clipped_ratio(tmp_path):
    trainer, messages, prompts, responses = make_trainer(tmp_path, "grpo")
    logp = trainer_logp(trainer, prompts, responses)
    rewards = [1.0, 0.0, 0.5, 0.0]
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # (r - group mean) / (unbiased group std + eps), both groups alike
    advantages = [a, -a, a, -a]
    total = sum(LENGTHS)

    def expected(ratio: float) -> float:  # per token max(-A r, -A clip(r, 0.8, 1.2)), token mean
        return sum(n * max(-adv * ratio, -adv * min(max(ratio, 0.8), 1.2))
                   for n, adv in zip(LENGTHS, advantages)) / total

    _, on_policy = loss_of(trainer, messages, prompts, responses, rewards, None)
    assert on_policy == pytest.approx(expected(1.0), abs=1e-6)
    metrics, off = loss_of(trainer, messages, prompts, responses, rewards, [lp - 0.5 for lp in logp])
    assert off == pytest.approx(expected(math.exp(0.5)), rel=1e-4)
    assert metrics["loss/ratio/mean"] == pytest.approx(math.exp(0.5), rel=1e-4)
