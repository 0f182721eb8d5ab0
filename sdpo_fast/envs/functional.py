"""Functional (HumanEval-style) tests: split test code into cases and judge each one outside the sandbox.

The test code comes from the data set and is trusted: it runs in the evaluator, with the name of the
function under test (and `candidate`) bound to a proxy. Each call through the proxy is sent to the
model's code in a fresh sandboxed process (`Sandbox` "call" mode) and the reply is plain data decoded by
the evaluator, so the asserts compare real values: code that exits early, patches builtins or
`AssertionError`, prints fake results, kills its parent, or returns an object whose `__eq__` is always
true cannot make an assert pass.

Splitting: with a `def check(candidate): ...` (HumanEval), each statement of its body that contains an
`assert` is one test case; the other statements (set-up) run before every later case. Without `check`, the
top-level statements are split the same way. Cases that never reach the function under test (e.g.
`assert True`) are dropped.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from functools import lru_cache

from sdpo_fast.envs.outcome import (OUTPUT_LIMIT, PASSED, RUNTIME_ERROR, TIME_LIMIT, WRONG_ANSWER,
                                    TestOutcome)
from sdpo_fast.envs.sandbox import Limits, Sandbox, SandboxEnded
from sdpo_fast.envs.sandbox_runner import UnsupportedValue

MAX_REPR = 300
_CHECK = "check"


@dataclass(frozen=True)
class FunctionalCase:
    """One test case: `source` is what the feedback shows, `program` defines `check(<param>)` for it."""

    source: str
    program: str
    param: str


@lru_cache(maxsize=4096)
def split_cases(test: str, entry_point: str) -> tuple[FunctionalCase, ...]:
    """The test cases of `test` (see the module docstring). Raises ValueError if there are none."""
    try:
        module = ast.parse(test)
    except SyntaxError as exc:
        raise ValueError(f"problem['test'] is not valid Python: {exc}") from exc
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == _CHECK]
    if checks:
        check = checks[-1]
        param = check.args.args[0].arg if check.args.args else "candidate"
        prelude = [s for s in module.body if s is not check and not _calls_check(s)]
        body = check.body
    else:
        param, prelude, body = "candidate", [], module.body
    targets = {param, entry_point.split(".")[0]}
    cases, setup = [], []
    for stmt in body:
        if not any(isinstance(node, ast.Assert) for node in ast.walk(stmt)):
            setup.append(stmt)
            continue
        if _mentions(setup + [stmt], targets):
            function = ast.parse(f"def {_CHECK}({param}): pass").body[0]
            function.body = setup + [_EqualityAsserts(targets).visit(_copy(stmt))]
            program = ast.Module(body=prelude + [function], type_ignores=[])
            cases.append(FunctionalCase(ast.unparse(stmt), ast.unparse(ast.fix_missing_locations(program)),
                                        param))
    if not cases:
        raise ValueError(f"problem['test'] has no assert that calls {entry_point!r} or 'candidate'")
    return tuple(cases)


def judge_case(code: str, entry_point: str, case: FunctionalCase, test_setup: str,
               limits: Limits) -> tuple[TestOutcome, tuple[str, ...]]:
    """Run one case against `code` in a fresh sandbox; returns the outcome and the isolation applied."""
    with Sandbox(code, "call", entry_point, limits) as box:
        proxy = _Proxy(box, entry_point)
        try:
            status, text = _reply_or_end(box, None, "")
            if status == "error":  # no input: the program failed before any test
                return TestOutcome(RUNTIME_ERROR, "", error=text), box.isolation
            namespace = {"__name__": "__judge__", "_sdpo_assert_equal": _assert_equal}
            exec(_compiled(test_setup or "pass"), namespace)
            namespace[proxy.name] = namespace[case.param] = proxy
            exec(_compiled(case.program), namespace)
            random.seed(0)  # test code that draws random inputs sees the same ones every time
            namespace[_CHECK](proxy)
            outcome = TestOutcome(PASSED, proxy.last_input, proxy.last_output)
        except _CaseFailed as failed:
            outcome = failed.outcome
        except _NotEqual as wrong:
            outcome = TestOutcome(WRONG_ANSWER, proxy.last_input, _short_repr(wrong.output),
                                  _short_repr(wrong.expected))
        except AssertionError:
            outcome = TestOutcome(WRONG_ANSWER, proxy.last_input, proxy.last_output, "", case.source)
        except Exception as exc:  # the trusted test failed on what the program returned
            outcome = TestOutcome(WRONG_ANSWER, proxy.last_input, proxy.last_output, "",
                                  f"{case.source}\n{type(exc).__name__}: {exc}"[:600])
        return outcome, box.isolation


class _CaseFailed(BaseException):
    """Raised through the test code (which may catch Exception) when the program errs, hangs or floods."""

    def __init__(self, outcome: TestOutcome) -> None:
        super().__init__(outcome.verdict)
        self.outcome = outcome


class _NotEqual(AssertionError):
    def __init__(self, output: object, expected: object) -> None:
        super().__init__("values differ")
        self.output, self.expected = output, expected


def _assert_equal(output: object, expected: object) -> None:
    if not output == expected:
        raise _NotEqual(output, expected)


class _Proxy:
    """Stands for the function under test in the judge; every call runs in the sandbox."""

    def __init__(self, box: Sandbox, entry_point: str) -> None:
        self.box, self.name = box, entry_point.split(".")[-1]
        self.last_input, self.last_output = "", ""

    def __call__(self, *args, **kwargs):
        parts = [_short_repr(a) for a in args] + [f"{k}={_short_repr(v)}" for k, v in kwargs.items()]
        self.last_input = f"{self.name}({', '.join(parts)})"[:MAX_REPR * 2]
        self.last_output = ""
        status, value = _reply_or_end(self.box, (args, kwargs), self.last_input)
        if status == "error":
            raise _CaseFailed(TestOutcome(RUNTIME_ERROR, self.last_input, error=value))
        self.last_output = _short_repr(value)
        return value


def _reply_or_end(box: Sandbox, call: tuple | None, shown_input: str) -> tuple[str, object]:
    """The sandbox's reply to `call`, or _CaseFailed naming why the process stopped first."""
    try:
        return box.call(*call) if call is not None else box.call(None)
    except UnsupportedValue as exc:
        raise ValueError(f"the test passes a value the sandbox cannot receive: {exc}") from None
    except SandboxEnded as ended:
        run = ended.result
        if run.output_exceeded:
            raise _CaseFailed(TestOutcome(OUTPUT_LIMIT, shown_input, error="the program printed too much"))
        if run.timed_out:
            raise _CaseFailed(TestOutcome(TIME_LIMIT, shown_input, error="time limit exceeded"))
        tail = run.stderr.strip()[-800:]
        reason = f"{run.exit_reason()} before returning a result"
        raise _CaseFailed(TestOutcome(RUNTIME_ERROR, shown_input, error=f"{tail}\n{reason}".strip()))


class _EqualityAsserts(ast.NodeTransformer):
    """`assert out == expected` -> `_sdpo_assert_equal(out, expected)`, so a failure shows both sides
    (the side that calls the function under test is the output)."""

    def __init__(self, targets: set[str]) -> None:
        self.targets = targets

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        test = node.test
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            return node
        left, right = test.left, test.comparators[0]
        if _mentions([right], self.targets) and not _mentions([left], self.targets):
            left, right = right, left
        call = ast.Call(func=ast.Name("_sdpo_assert_equal", ast.Load()), args=[left, right], keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def _mentions(nodes: list[ast.AST], names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for node in nodes for n in ast.walk(node))


def _calls_check(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == _CHECK)


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node)).body[0]


@lru_cache(maxsize=4096)
def _compiled(source: str):
    return compile(source, "<test>", "exec", optimize=0)


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."
