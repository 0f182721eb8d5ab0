"""What the trainer trains on: a task's train and held-out problems, its environment, its prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdpo_fast.envs import CodeEnv, Environment, MathEnv, load_humaneval, load_jsonl, make_problems, task_env
from sdpo_fast.envs.tasks import split_of

BUILTIN_TASKS = ("arithmetic", "string", "code")


@dataclass
class Task:
    """Problems (dicts with a "prompt") split into train and held-out, and the environment scoring them."""

    name: str
    train: list[dict]
    heldout: list[dict]
    env: Environment

    def messages(self, problem: dict) -> list[dict]:
        """The chat the policy answers: one user message with the problem's prompt."""
        return [{"role": "user", "content": problem["prompt"]}]

    def batch(self, step: int, size: int, seed: int) -> list[dict]:
        """The `size` training problems of `step` (1-based): a seeded shuffle, reshuffled every epoch.

        A pure function of (step, size, seed), so a resumed run sees exactly the problems it would have.
        """
        n = len(self.train)
        start = (step - 1) * size
        out = []
        for k in range(start, start + size):
            epoch, index = divmod(k, n)
            order = list(range(n))
            random.Random(f"{seed}/{epoch}").shuffle(order)
            out.append(self.train[order[index]])
        return out


def load_task(spec: str, *, seed: int = 0, train_size: int = 2000, heldout_size: int = 200,
              options: dict | None = None) -> Task:
    """A task by name: a built-in task ("arithmetic", "string", "code"), "humaneval", or "code:FILE.jsonl" /
    "math:FILE.jsonl". Built-in tasks take generator knobs in `options` (e.g. {"digits": 2}) and give up to
    `train_size` / `heldout_size` problems (fewer when fewer exist; batches cycle in epochs); files and
    HumanEval are split into train / held-out by a stable hash of each prompt (1 in 5 held out).
    """
    # Command-line knobs arrive as strings: "3" -> 3, "+-" stays text.
    options = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (options or {}).items()}
    feedback = options.pop("feedback", "hint")
    if spec in BUILTIN_TASKS:
        return Task(spec, make_problems(spec, "train", train_size, seed, at_most=True, **options),
                    make_problems(spec, "heldout", heldout_size, seed, at_most=True, **options),
                    task_env(spec, feedback))
    if options:
        raise ValueError(f"task options {sorted(options)} apply to built-in tasks only, not {spec!r}")
    if spec == "humaneval":
        return _split("humaneval", load_humaneval(), CodeEnv())
    kind, sep, path = spec.partition(":")
    if sep and kind in ("code", "math"):
        if not Path(path).is_file():
            raise ValueError(f"task {spec!r}: no such file {path}")
        return _split(spec, load_jsonl(path, kind), CodeEnv() if kind == "code" else MathEnv())
    raise ValueError(f"task must be one of {BUILTIN_TASKS}, 'humaneval', 'code:FILE.jsonl' or "
                     f"'math:FILE.jsonl', got {spec!r}")


def _split(name: str, problems: list[dict], env: Environment) -> Task:
    train = [p for p in problems if split_of(p["prompt"]) == "train"]
    heldout = [p for p in problems if split_of(p["prompt"]) == "heldout"]
    if not train or not heldout:
        raise ValueError(f"task {name!r} has too few problems ({len(problems)}) for a train / held-out split")
    return Task(name, train, heldout, env)
