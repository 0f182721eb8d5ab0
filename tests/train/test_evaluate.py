"""Held-out evaluation: greedy answers of the model, and only a reward of exactly 1 counts as correct."""

from __future__ import annotations

from sdpo_fast.envs import Evaluation
from sdpo_fast.models import load_model, load_tokenizer
from sdpo_fast.train.data import load_task
from sdpo_fast.train.evaluate import heldout_correct


class PerProblem:
    """Rewards by problem position (1.0 = solved), whatever the response; keeps the responses it saw."""

    def __init__(self, rewards: list[float]):
        self.rewards, self.seen = rewards, []

    def evaluate(self, problems, responses):
        self.seen.append(list(responses))
        return [Evaluation(r) for r in self.rewards[:len(problems)]]


def test_heldout_correct_counts_rewards_of_exactly_one_on_greedy_answers():
    task = load_task("arithmetic", train_size=1, heldout_size=3)
    model, tokenizer = load_model("tiny-random"), load_tokenizer()
    evaluator = PerProblem([1.0, 0.99, 1.0])  # partial credit is not a solved problem
    kw = dict(max_new_tokens=5, batch_size=2)
    assert heldout_correct(model, tokenizer, task, task.heldout, evaluator, **kw) == 2
    assert heldout_correct(model, tokenizer, task, task.heldout, evaluator, **kw) == 2
    first, again = evaluator.seen
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert again == first  # greedy decoding: the same answers every time
    assert heldout_correct(model, tokenizer, task, [], evaluator, **kw) == 0 and len(evaluator.seen) == 2
