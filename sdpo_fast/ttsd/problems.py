"""Where a test-time search gets its problem: a task's split by index, or one line of a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from sdpo_fast.envs import AnswerEnv, CodeEnv, Environment, MathEnv, load_jsonl
from sdpo_fast.train.data import load_task
from sdpo_fast.ttsd.config import TTSDConfig


def problem_of(cfg: TTSDConfig) -> tuple[dict, Environment]:
    """The problem `cfg` names and its environment."""
    if cfg.problem_file is not None:
        return file_problem(cfg.problem_file, cfg.line, cfg.kind, cfg.feedback)
    problems, env = task_problems(cfg.task, cfg.split, cfg.index + 1, cfg.task_options, cfg.feedback)
    return problems[cfg.index], env


def task_problems(task: str, split: str, count: int, options: dict | None = None,
                  feedback: str = "hint") -> tuple[list[dict], Environment]:
    """The first `count` problems of a task's split (built-in tasks generated with seed 0) and its env."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    options = {**(options or {}), "feedback": feedback}  # used by the direct-answer tasks only
    loaded = load_task(task, seed=0, train_size=count, heldout_size=count, options=options)
    problems = loaded.train if split == "train" else loaded.heldout
    if len(problems) < count:
        raise ValueError(f"index: task {task!r} has only {len(problems)} {split} problems, asked for {count}")
    return problems[:count], loaded.env


def file_problem(path: Path, line: int, kind: str, feedback: str = "hint") -> tuple[dict, Environment]:
    """Problem number `line` (0-based, blank lines skipped) of a JSONL file and its environment.

    kind "code" and "math" follow `sdpo_fast.envs.load_jsonl`; "answer" is the built-in direct-answer
    schema {"prompt", "answer", "kind": "number" | "text"}.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"problem_file: no such file {path}")
    if kind in ("code", "math"):
        problems = load_jsonl(path, kind)
    elif kind == "answer":
        problems = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        raise ValueError(f"kind must be 'code', 'math' or 'answer', got {kind!r}")
    if not 0 <= line < len(problems):
        raise ValueError(f"line must be in [0, {len(problems)}) for {path}, got {line}")
    problem = problems[line]
    if kind == "answer":
        env = AnswerEnv(feedback)
        if not isinstance(problem.get("prompt"), str):
            raise ValueError(f"{path}, problem {line}: an answer problem needs a 'prompt' string")
        env.evaluate(problem, "")  # raises ValueError naming a missing 'answer' / 'kind'
        return problem, env
    return problem, CodeEnv() if kind == "code" else MathEnv()
