"""The code environment: run the response's last ```python block against the problem's tests.

Problem schemas (plain dicts, e.g. one JSON line each):

- stdin/stdout: `{"prompt": str, "tests": [{"input": str, "output": str}, ...]}`. The program reads
  `input` on stdin; its stdout must equal `output` line by line, ignoring surrounding whitespace, with
  numeric tokens compared as numbers ("0.50" equals "0.5").
- functional (HumanEval style): `{"prompt": str, "test": str, "entry_point": str}` and optionally
  `"test_setup": str` (trusted code the judge runs before the tests, e.g. helpers the prompt defines)
  and `"imports": str` (prepended to the program, e.g. `from typing import List`). `test` holds Python
  asserts, either in `def check(candidate): ...` or at top level calling `entry_point` by name; see
  `functional.py` for how it is split into cases and judged.

Every test runs in its own sandboxed process (`sandbox/`). Reward: the fraction of tests passed
(`reward_mode="fraction"`, for training) or 1 only when all pass (`"all"`, for evaluation). Feedback: the
first error (runtime error with a short traceback and the last executed input, time or output limit),
otherwise the two shortest failing cases with input, output and expected; at most `max_feedback_chars`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sdpo_fast.envs.functional import judge_case, split_cases
from sdpo_fast.envs.outcome import (ERRORS, OUTPUT_LIMIT, PASSED, RUNTIME_ERROR, TIME_LIMIT, WRONG_ANSWER,
                                    Evaluation, TestOutcome)
from sdpo_fast.envs.sandbox import Limits, run_stdio

PYTHON_FENCE_TAGS = ("python", "py", "python3", "")
FORMAT_FEEDBACK = ("Format error: no complete ```python code block was found. Put the whole program in "
                   "one block that starts with ```python and ends with ```.")
_FIELD_CHARS = 400
_TITLES = {RUNTIME_ERROR: "Runtime Error", TIME_LIMIT: "Time Limit Exceeded",
           OUTPUT_LIMIT: "Output Limit Exceeded", WRONG_ANSWER: "Wrong Answer"}


@dataclass(frozen=True)
class CodeEnv:
    """Sandboxed code execution with test-level feedback (see the module docstring)."""

    limits: Limits = field(default_factory=Limits)
    reward_mode: str = "fraction"
    max_feedback_chars: int = 2000

    def __post_init__(self) -> None:
        if self.reward_mode not in ("fraction", "all"):
            raise ValueError(f"reward_mode must be 'fraction' or 'all', got {self.reward_mode!r}")
        if self.max_feedback_chars < 200:
            raise ValueError(f"max_feedback_chars must be at least 200, got {self.max_feedback_chars}")

    def evaluate(self, problem: dict, response: str) -> Evaluation:
        kind = check_code_problem(problem)
        code = extract_code(response)
        if code is None:
            return Evaluation(0.0, FORMAT_FEEDBACK, {"format_error": True, "passed": 0,
                                                      "total": _count_tests(problem, kind)})
        if kind == "stdio":
            results = [run_stdio_test(code, test, self.limits) for test in problem["tests"]]
        else:
            program = (problem.get("imports", "").rstrip() + "\n\n" + code) if problem.get("imports") else code
            results = [judge_case(program, problem["entry_point"], case, problem.get("test_setup", ""),
                                  self.limits)
                       for case in split_cases(problem["test"], problem["entry_point"])]
        outcomes = [outcome for outcome, _ in results]
        passed = sum(o.verdict == PASSED for o in outcomes)
        total = len(outcomes)
        reward = passed / total if self.reward_mode == "fraction" else float(passed == total)
        details = {"format_error": False, "passed": passed, "total": total,
                   "verdicts": [o.verdict for o in outcomes], "isolation": list(results[0][1])}
        return Evaluation(reward, code_feedback(outcomes, self.max_feedback_chars), details)


def check_code_problem(problem: dict) -> str:
    """The schema of `problem` ("stdio" or "functional"); ValueError naming what is wrong otherwise."""
    if not isinstance(problem, dict):
        raise ValueError(f"problem must be a dict, got {type(problem).__name__}")
    if "tests" in problem:
        tests = problem["tests"]
        if not isinstance(tests, list) or not tests or not all(
                isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)
                for t in tests):
            raise ValueError("problem['tests'] must be a non-empty list of {'input': str, 'output': str}")
        return "stdio"
    if isinstance(problem.get("test"), str) and isinstance(problem.get("entry_point"), str):
        for key in ("test_setup", "imports"):
            if not isinstance(problem.get(key, ""), str):
                raise ValueError(f"problem[{key!r}] must be a string")
        return "functional"
    raise ValueError("a code problem needs 'tests' (stdin/stdout) or 'test' and 'entry_point' (functional)")


def extract_code(response: str) -> str | None:
    """The last complete fenced Python block (```python, ```py, ```python3 or untagged ```), else None."""
    blocks, tag, lines = [], "", None
    for line in response.splitlines():
        stripped = line.strip()
        if lines is None:
            if stripped.startswith("```"):
                tag, lines = stripped[3:].strip().lower(), []
        elif stripped.startswith("```"):
            blocks.append((tag, "\n".join(lines)))
            lines = None
        else:
            lines.append(line)
    python = [code for tag, code in blocks if tag in PYTHON_FENCE_TAGS and code.strip()]
    return python[-1] + "\n" if python else None


def run_stdio_test(code: str, test: dict, limits: Limits) -> tuple[TestOutcome, tuple[str, ...]]:
    """Run `code` on the test's input in a fresh sandbox and judge its stdout."""
    run, isolation = run_stdio(code, test["input"], limits)
    shown = test["input"] or "(empty input)"
    if run.output_exceeded:
        return TestOutcome(OUTPUT_LIMIT, shown, error="the program printed too much"), isolation
    if run.timed_out:
        return TestOutcome(TIME_LIMIT, shown, error="time limit exceeded"), isolation
    if run.returncode != 0:
        reason = run.stderr.strip()[-800:]
        if reason and run.returncode is not None and run.returncode > 0:
            error = reason
        else:  # killed by a signal (or by the memory cgroup): say so, after what it printed
            error = f"{reason}\n{run.exit_reason()}".strip()
        return TestOutcome(RUNTIME_ERROR, shown, run.stdout, error=error), isolation
    verdict = PASSED if outputs_match(run.stdout, test["output"]) else WRONG_ANSWER
    return TestOutcome(verdict, shown, run.stdout, test["output"]), isolation


def outputs_match(got: str, expected: str) -> bool:
    """Line-by-line equality of whitespace-separated tokens; numeric tokens compare as numbers."""
    got_lines, want_lines = got.strip().splitlines(), expected.strip().splitlines()
    if len(got_lines) != len(want_lines):
        return False
    for g, w in zip(got_lines, want_lines):
        g_tokens, w_tokens = g.split(), w.split()
        if len(g_tokens) != len(w_tokens):
            return False
        if not all(a == b or _same_number(a, b) for a, b in zip(g_tokens, w_tokens)):
            return False
    return True


def _same_number(a: str, b: str) -> bool:
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    return x.is_finite() and y.is_finite() and x == y


def code_feedback(outcomes: list[TestOutcome], max_chars: int = 2000) -> str:
    """Feedback for failed tests: the first error, else the two shortest wrong answers; "" if all passed."""
    errors = [o for o in outcomes if o.verdict in ERRORS]
    wrong = [o for o in outcomes if o.verdict == WRONG_ANSWER]
    if errors:
        shown = errors[:1]
    else:
        shown = sorted(wrong, key=lambda o: len(o.input) + len(o.output) + len(o.expected))[:2]
    if not shown:
        return ""
    passed = sum(o.verdict == PASSED for o in outcomes)
    parts = [f"{passed} of {len(outcomes)} tests passed."] + [_describe(o) for o in shown]
    text = "\n\n".join(parts)
    return text if len(text) <= max_chars else text[:max_chars - 4] + "\n..."


def _describe(o: TestOutcome) -> str:
    last_line = (o.error.strip().splitlines() or [""])[-1]
    syntax = o.verdict == RUNTIME_ERROR and last_line.startswith(("SyntaxError", "IndentationError", "TabError"))
    lines = ["Syntax Error" if syntax else _TITLES[o.verdict]]
    if o.verdict == WRONG_ANSWER:
        if o.error:
            lines += ["Failed check:", _clip(o.error)]
        lines += ["Input:", _clip(o.input), "Output:", _clip(o.output) or "(nothing)"]
        if o.expected:
            lines += ["Expected:", _clip(o.expected)]
    else:
        if o.verdict == RUNTIME_ERROR:
            lines.append(_clip(o.error, 800))
        if o.input:
            lines += ["Last executed input:", _clip(o.input)]
        else:
            lines.append("(The program failed before running any test.)")
    return "\n".join(lines)


def _clip(text: str, limit: int = _FIELD_CHARS) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else text[:limit] + "..."


def _count_tests(problem: dict, kind: str) -> int:
    return len(problem["tests"]) if kind == "stdio" else len(split_cases(problem["test"], problem["entry_point"]))
