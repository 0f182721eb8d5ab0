"""Loaders: HumanEval (split into single-assert cases) and JSONL files, including LiveCodeBench style."""

import json

import pytest

from sdpo_fast.envs import CodeEnv, Limits, load_humaneval, load_jsonl
from sdpo_fast.envs.functional import split_cases


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_humaneval_loads_and_splits(humaneval):
    assert len(humaneval) == 164
    counts = [len(split_cases(p["test"], p["entry_point"])) for p in humaneval]
    assert min(counts) >= 1 and sum(counts) > 900  # split: most problems have several cases
    first = humaneval[0]
    assert "```python" in first["prompt"] and first["imports"] == "from typing import List"


def test_humaneval_canonical_and_wrong_solutions(humaneval):
    env = CodeEnv(limits=Limits(cpu_s=2.0, wall_s=4.0), reward_mode="all")
    for p in humaneval[:2] + humaneval[32:33] + humaneval[38:39]:  # 32 and 38 use helpers from the prompt
        good = env.evaluate(p, f"```python\n{p['test_setup']}{p['canonical_solution']}\n```")
        assert good.reward == 1.0, (p["task_id"], good.feedback)
        bad = env.evaluate(p, f"```python\n{p['test_setup']}    return None\n```")
        assert bad.reward == 0.0 and bad.feedback


def test_jsonl_code_math_and_livecodebench(tmp_path):
    path = tmp_path / "code.jsonl"
    records = [
        {"prompt": "sum", "tests": [{"input": "1 2\n", "output": "3\n"}]},
        {"prompt": "sq", "test": "assert sq(3) == 9", "entry_point": "sq"},
        {"question_content": "Add two numbers.", "starter_code": "class Solution:\n    def add(self, a, b):\n",
         "metadata": json.dumps({"func_name": "add"}),
         "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}])},
        {"question_content": "Echo.", "public_test_cases": [{"input": "x\n", "output": "x\n", "testtype": "stdin"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    problems = load_jsonl(path, "code")
    assert len(problems) == 4 and problems[2]["entry_point"] == "Solution.add"
    env = CodeEnv(limits=Limits(cpu_s=1.0, wall_s=2.0))
    solution = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    assert env.evaluate(problems[2], solution).reward == 1.0
    assert env.evaluate(problems[3], "```python\nprint(input())\n```").reward == 1.0

    math_path = tmp_path / "math.jsonl"
    math_path.write_text(json.dumps({"prompt": "1+1", "answer": 2}) + "\n")
    assert load_jsonl(math_path, "math") == [{"prompt": "1+1", "answer": "2"}]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "tests": [{"input": "1"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_jsonl(path, "code")
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_jsonl(path, "math")
    with pytest.raises(ValueError, match="kind"):
        load_jsonl(path, "chess")
