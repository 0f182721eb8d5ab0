"""BatchEvaluator: order, parallelism, and isolation of crashing, hanging and raising items."""

import os
import uuid

import pytest

from sdpo_fast.envs import BatchEvaluator, CodeEnv, Limits, evaluate_batch
from tests.envs.conftest import ScriptedEnv, processes_ending_with


def test_results_in_order_and_failures_isolated():
    problems = [{"x": 1}, {"x": 2, "do": "crash"}, {"x": 3}, {"x": 4, "do": "hang"}, {"x": 5, "do": "raise"},
                {"x": 6, "do": "wrong type"}, {"x": 7}]
    responses = [f"r{i}" for i in range(len(problems))]
    with BatchEvaluator(ScriptedEnv(), workers=2, timeout_s=2.0) as evaluator:
        results = evaluator.evaluate(problems, responses)
        again = evaluator.evaluate([{"x": 8}], ["after"])  # the pool recovered from the crash and the hang
    assert [r.reward for r in results] == [0.1, 0.0, 0.3, 0.0, 0.0, 0.0, 0.7]
    assert results[0].feedback == "saw r0" and results[6].feedback == "saw r6"
    assert "died" in results[1].details["error"]
    assert "timed out" in results[3].details["error"] and results[3].feedback == "The evaluation timed out."
    assert "broken evaluator" in results[4].details["error"]
    assert "not Evaluation" in results[5].details["error"]
    assert again[0].reward == pytest.approx(0.8)
    assert results[0].details["pid"] != os.getpid()  # evaluated in a worker


def test_processes_of_a_stopped_worker_are_killed():
    marker = f"{os.getpid() % 1000}.{uuid.uuid4().int % 10**6}"
    with BatchEvaluator(ScriptedEnv(), workers=1, timeout_s=3.0) as evaluator:
        result, = evaluator.evaluate([{"x": 1, "do": "daemon then hang", "marker": marker}], ["r"])
    assert "timed out" in result.details["error"]
    assert processes_ending_with(marker) == []

def test_code_batch_is_deterministic():
    problem = {"prompt": "", "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"}
    responses = ["```python\ndef f(x):\n    return x * x\n```", "```python\ndef f(x):\n    return x + x\n```",
                 "no code", "```python\ndef f(x):\n    return sorted({'b', 'a', 'c'})[0] * x\n```"]
    env = CodeEnv(limits=Limits(cpu_s=1.0, wall_s=2.0))
    first = evaluate_batch(env, [problem] * 4, responses, workers=2)
    second = evaluate_batch(env, [problem] * 4, responses, workers=1)
    assert [r.reward for r in first] == [1.0, 0.5, 0.0, 0.0]
    assert [(r.reward, r.feedback) for r in first] == [(r.reward, r.feedback) for r in second]


def test_argument_checks():
    with pytest.raises(ValueError, match="workers"):
        BatchEvaluator(ScriptedEnv(), workers=0)
    with BatchEvaluator(ScriptedEnv(), workers=1) as evaluator, pytest.raises(ValueError, match="responses"):
        evaluator.evaluate([{"x": 1}], [])
