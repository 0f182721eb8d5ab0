"""CodeEnv: rewards and feedback for correct, wrong, erroring, slow and badly formatted solutions, and
hostile solutions that try to fake a pass."""

import os

import pytest

from sdpo_fast.envs import CodeEnv, Limits, extract_code
from sdpo_fast.envs.code_env import code_feedback, outputs_match
from sdpo_fast.envs.functional import split_cases
from sdpo_fast.envs.outcome import PASSED, WRONG_ANSWER, TestOutcome

ENV = CodeEnv(limits=Limits(cpu_s=1.0, wall_s=2.0, memory_mb=256, processes=6, output_bytes=1 << 16))
FAST_ENV = CodeEnv(limits=Limits(cpu_s=1.0, wall_s=1.0, memory_mb=256, processes=6, output_bytes=1 << 16))
STDIO = {"prompt": "Print the sum of two integers.",
         "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"},
                   {"input": "0 0\n", "output": "0\n"}]}
FUNC = {"prompt": "add", "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n"
                "    assert candidate(2, 2) == 4\n    assert True\n"}


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code_takes_the_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```cpp\nint x;\n```\n```py\ny = 2\n```\n"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\nprint(1)\n") is None  # never closed (truncated)
    assert extract_code("```\nz = 3\n```") == "z = 3\n"


def test_outputs_match_rules():
    assert outputs_match("3\n", "3") and outputs_match("1 2 \n 3\n\n", "1 2\n3")
    assert outputs_match("0.50\n", "0.5") and not outputs_match("0.51", "0.5")
    assert not outputs_match("1 2", "1\n2") and not outputs_match("abc", "abd")


def test_stdio_correct_wrong_error_timeout_format():
    good = ENV.evaluate(STDIO, block("a, b = map(int, input().split())\nprint(a + b)"))
    assert good.reward == 1.0 and good.feedback == "" and good.details["passed"] == 3

    wrong = ENV.evaluate(STDIO, block("a, b = map(int, input().split())\nprint(a - b if a > 5 else a + b)"))
    assert wrong.reward == pytest.approx(2 / 3)
    assert "Wrong Answer" in wrong.feedback and "10 -4" in wrong.feedback and "14" in wrong.feedback
    assert "Expected:\n6" in wrong.feedback

    error = ENV.evaluate(STDIO, block("a, b = input().split()\nprint(int(b) // (int(a) - int(a)))"))
    assert error.reward == 0.0 and error.feedback.startswith("0 of 3 tests passed.")
    assert "Runtime Error" in error.feedback and "ZeroDivisionError" in error.feedback
    assert "Last executed input:\n1 2" in error.feedback

    slow = FAST_ENV.evaluate(STDIO, block("while True:\n    pass"))
    assert slow.reward == 0.0 and "Time Limit Exceeded" in slow.feedback

    missing = ENV.evaluate(STDIO, "I would add the numbers.")
    assert missing.reward == 0.0 and missing.details["format_error"] and "```python" in missing.feedback


def test_functional_rewards_feedback_and_modes():
    assert len(split_cases(FUNC["test"], "add")) == 3  # `assert True` never reaches the function
    good = ENV.evaluate(FUNC, block("def add(a, b):\n    return a + b"))
    assert good.reward == 1.0 and good.details["verdicts"] == [PASSED] * 3

    wrong_src = block("def add(a, b):\n    return a * b if a > 0 else a + b")
    wrong = ENV.evaluate(FUNC, wrong_src)
    assert wrong.reward == pytest.approx(2 / 3)
    assert "Wrong Answer\nInput:\nadd(1, 2)\nOutput:\n2\nExpected:\n3" in wrong.feedback
    assert CodeEnv(limits=ENV.limits, reward_mode="all").evaluate(FUNC, wrong_src).reward == 0.0

    error = ENV.evaluate(FUNC, block("def add(a, b):\n    return [a][b]"))
    assert error.reward == 0.0 and "IndexError" in error.feedback and "add(1, 2)" in error.feedback
    assert 'File "solution.py", line 2, in add' in error.feedback

    missing = ENV.evaluate(FUNC, block("def plus(a, b):\n    return a + b"))
    assert missing.reward == 0.0 and "does not define 'add'" in missing.feedback


def test_feedback_shows_two_shortest_failures_and_is_capped():
    outcomes = [TestOutcome(WRONG_ANSWER, "x" * n, "out", "exp") for n in (50, 5, 500, 7)]
    text = code_feedback(outcomes)
    assert text.count("Wrong Answer") == 2 and "x" * 5 in text and "x" * 7 in text and "x" * 50 not in text
    huge = [TestOutcome(WRONG_ANSWER, "y" * 5000, "o" * 5000, "e" * 5000)] * 2
    assert len(code_feedback(huge)) <= 2000
    many = ENV.evaluate({"prompt": "", "tests": [{"input": "", "output": "x" * 3000}]}, block("print('y' * 3000)"))
    assert len(many.feedback) <= 2000


@pytest.mark.parametrize("name, source", [
    ("exit before tests", "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b"),
    ("os._exit before tests", "import os\nos._exit(0)"),
    ("eq always true", "class Any:\n    def __eq__(self, other):\n        return True\n"
                       "    __hash__ = object.__hash__\ndef add(a, b):\n    return Any()"),
    ("int subclass with eq", "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                             "def add(a, b):\n    return Int(0)"),
    ("patched builtins and assert", "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
                                    "builtins.print = lambda *a, **k: None\nbuiltins.abs = lambda x: 0\n"
                                    "def add(a, b):\n    return None"),
    ("fake pass printed", "print('3 of 3 tests passed')\nprint('{\"ok\": 3}')\ndef add(a, b):\n    return -1"),
    ("forged replies", "import os\nfor fd in range(3, 12):\n    try:\n"
                       "        os.write(fd, b'{\"ok\": null}\\n{\"ok\": true}\\n{\"ok\": true}\\n')\n"
                       "    except OSError:\n        pass\ndef add(a, b):\n    return -1"),
    ("kill parent", "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
                    "    pass\nos.kill(-1, signal.SIGKILL)"),
    ("hang", "import time\ndef add(a, b):\n    time.sleep(60)"),
])
def test_hostile_functional_solutions_get_no_reward(name, source):
    result = FAST_ENV.evaluate(FUNC, block(source))
    assert result.reward == 0.0, (name, result)
    assert result.feedback and "0 of 3 tests passed" in result.feedback
    assert os.getpid() > 0  # the evaluator is still here to assert


def test_hostile_feedback_is_clear():
    exited = ENV.evaluate(FUNC, block("import sys\nsys.exit(0)"))
    assert "SystemExit" in exited.feedback and "failed before running any test" in exited.feedback
    syntax = ENV.evaluate(FUNC, block("def add(a, b):\n    return (a + b]"))
    assert syntax.feedback.splitlines()[2] == "Syntax Error" and 'File "solution.py", line 2' in syntax.feedback
    assert "<string>" not in syntax.feedback and "Traceback" not in syntax.feedback
    fake = ENV.evaluate(FUNC, block("class Any:\n    def __eq__(self, o):\n        return True\n"
                                    "def add(a, b):\n    return Any()"))
    assert "not plain data" in fake.feedback
    hang = FAST_ENV.evaluate(FUNC, block("def add(a, b):\n    while True:\n        pass"))
    assert "Time Limit Exceeded" in hang.feedback and "add(1, 2)" in hang.feedback


def test_functional_top_level_asserts_and_setup():
    problem = {"prompt": "", "entry_point": "double", "imports": "from typing import List",
               "test_setup": "def helper(x):\n    return 2 * x\n",
               "test": "xs = [1, 2, 3]\nassert double(xs) == [helper(x) for x in xs]\nassert double([]) == []\n"}
    result = ENV.evaluate(problem, block("def double(xs: List[int]) -> List[int]:\n    return [2 * x for x in xs]"))
    assert result.reward == 1.0 and result.details["total"] == 2


def test_bad_problems_raise():
    with pytest.raises(ValueError, match="tests"):
        ENV.evaluate({"tests": []}, block("pass"))
    with pytest.raises(ValueError, match="entry_point"):
        ENV.evaluate({"test": "assert True"}, block("pass"))
    with pytest.raises(ValueError, match="no assert"):
        ENV.evaluate({"test": "x = 1", "entry_point": "f"}, block("pass"))
    with pytest.raises(ValueError, match="reward_mode"):
        CodeEnv(reward_mode="best")
