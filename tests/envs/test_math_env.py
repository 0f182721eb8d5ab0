"""MathEnv: boxed-answer extraction, equivalence via math-verify under our own timeout, feedback."""

import time

import pytest

from sdpo_fast.envs import MathEnv
from sdpo_fast.envs.math_env import last_boxed, run_with_timeout

ENV = MathEnv(timeout_s=20.0)


def test_last_boxed():
    assert last_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("gold, pred, reward", [
    ("42", "42", 1.0), (r"\frac{1}{2}", "0.5", 1.0), ("1/2", r"\frac{1}{2}", 1.0), ("2x+1", "1+2x", 1.0),
    (r"\sqrt{2}", "1.41", 0.0), ("42", "41", 0.0),
])
def test_equivalence(gold, pred, reward):
    assert ENV.evaluate({"prompt": "", "answer": gold}, rf"The answer is \boxed{{{pred}}}.").reward == reward


def test_feedback_never_reveals_the_answer():
    wrong = ENV.evaluate({"prompt": "", "answer": "1729"}, r"\boxed{1728}")
    assert wrong.reward == 0.0 and "1728" in wrong.feedback and "1729" not in wrong.feedback
    missing = ENV.evaluate({"prompt": "", "answer": "1729"}, "It is 1729.")
    assert missing.reward == 0.0 and missing.details["format_error"] and "\\boxed" in missing.feedback
    with pytest.raises(ValueError, match="answer"):
        ENV.evaluate({"prompt": ""}, r"\boxed{1}")


def _sleep_then(value):
    time.sleep(30)
    return value


def test_own_timeout_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # math-verify's SIGALRM timeout would fail here
        future = pool.submit(run_with_timeout, _sleep_then, (1,), 0.5)
        with pytest.raises(TimeoutError):
            future.result()
        assert pool.submit(run_with_timeout, abs, (-3,), 5.0).result() == 3
    assert time.monotonic() - start < 10
