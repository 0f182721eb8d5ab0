"""Built-in tasks: deterministic generation, disjoint splits, scoring and feedback."""

import pytest

from sdpo_fast.envs import AnswerEnv, make_problems, task_env
from sdpo_fast.envs.tasks import STRING_OPS, split_of


@pytest.mark.parametrize("task", ["arithmetic", "string", "code"])
def test_deterministic_and_disjoint(task):
    train = make_problems(task, "train", 40, seed=1)
    assert train == make_problems(task, "train", 40, seed=1)
    assert train != make_problems(task, "train", 40, seed=2)
    heldout = make_problems(task, "heldout", 10, seed=1)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert all(split_of(p["prompt"]) == "heldout" for p in heldout)
    assert len({p["prompt"] for p in train}) == 40


def test_arithmetic_scoring_and_feedback():
    problem = make_problems("arithmetic", "train", 1, digits=3, ops="+")[0]
    answer = int(problem["answer"])
    env = AnswerEnv("hint")
    assert env.evaluate(problem, f"Adding up.\nAnswer: {answer}").reward == 1.0
    assert env.evaluate(problem, f"**Answer:** {answer:,}.").reward == 1.0
    wrong = env.evaluate({"answer": "1295", "kind": "number"}, "Answer: 1285")
    assert wrong.reward == 0.0 and "larger; the tens digit is wrong" in wrong.feedback
    assert "1295" not in wrong.feedback
    assert "has 4 digits, not 3" in env.evaluate({"answer": "1295", "kind": "number"}, "Answer: 995").feedback
    told = AnswerEnv("answer").evaluate(problem, f"Answer: {answer + 1}")
    assert f"The correct answer is {answer}." in told.feedback
    expression = problem["prompt"].split("?")[0].removeprefix("What is ")
    assert env.evaluate(problem, f"{expression} = {answer}").reward == 1.0  # no Answer line: the last number
    fmt = env.evaluate(problem, "I do not know.")
    assert fmt.reward == 0.0 and fmt.details["format_error"] and "Answer: <your answer>" in fmt.feedback
    assert "digits only" in env.evaluate(problem, "Answer: about three hundred").feedback


def test_string_feedback():
    env = AnswerEnv()
    problem = {"prompt": "", "answer": "elppa", "kind": "text"}
    assert env.evaluate(problem, "Answer: 'elppa'").reward == 1.0
    assert "from character 3 on" in env.evaluate(problem, "Answer: elapp").feedback
    assert "5 characters, yours has 4" in env.evaluate(problem, "Answer: lppa").feedback


def test_code_task_reference_solutions_pass():
    problems = make_problems("code", "heldout", 3, seed=0, ops="reverse,double,count_vowels")
    env = task_env("code")
    bodies = {"reverse": "return s[::-1]", "double": "return ''.join(c * 2 for c in s)",
              "count_vowels": "return sum(c in 'aeiou' for c in s)"}
    for p in problems:
        good = env.evaluate(p, f"```python\ndef {p['entry_point']}(s):\n    {bodies[p['op']]}\n```")
        assert good.reward == 1.0, good
        bad = env.evaluate(p, f"```python\ndef {p['entry_point']}(s):\n    return s\n```")
        assert bad.reward < 1.0 and "Wrong Answer" in bad.feedback


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        make_problems("chess", "train", 1)
    with pytest.raises(ValueError, match="split"):
        make_problems("string", "test", 1)
    with pytest.raises(ValueError, match="ops"):
        make_problems("string", "train", 1, ops="rot13")
    with pytest.raises(ValueError, match="too few"):
        make_problems("arithmetic", "heldout", 64, digits=1, ops="+")
    with pytest.raises(ValueError, match="digits_b"):
        make_problems("arithmetic", "train", 1, digits=2, digits_b=12)
    mixed = make_problems("arithmetic", "train", 20, digits=2, digits_b=1, ops="+")
    assert all(len(p["prompt"].split()[4].rstrip("?")) == 1 for p in mixed)
    with pytest.raises(ValueError, match="feedback"):
        AnswerEnv("everything")
    assert set(STRING_OPS) >= {"reverse", "length"}
