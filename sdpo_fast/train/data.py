"""What the trainer trains on: a task's train and held-out problems, its environment, its prompts."""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo_fast.envs import CodeEnv, Environment, MathEnv, load_humaneval, load_jsonl, make_problems, task_env
from sdpo_fast.envs.code_env import check_code_problem
from sdpo_fast.envs.tasks import _GENERATORS, FEEDBACK_LEVELS, split_of  # the generators' knobs and defaults

BUILTIN_TASKS = ("arithmetic", "string", "code")
DATASET_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class Task:
    """Problems (dicts with a "prompt") split into train and held-out, and the environment scoring them."""

    name: str
    train: list[dict]
    heldout: list[dict]
    env: Environment

    def messages(self, problem: dict) -> list[dict]:
        """The chat the policy answers: the problem's system prompt (if any), then its prompt as the user."""
        system = [{"role": "system", "content": problem["system"]}] if problem.get("system") else []
        return system + [{"role": "user", "content": problem["prompt"]}]

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


def task_options(spec: str, options: dict | None) -> tuple[dict, str]:
    """(generator knobs, feedback level) of a built-in task, checked on one problem (fast). Command-line values
    arrive as strings and are converted to the type of the knob's default ("3" -> 3 for `digits`, "+-" stays
    text for `ops`)."""
    options = dict(options or {})
    feedback = str(options.pop("feedback", "hint"))
    if spec not in BUILTIN_TASKS:
        if options:
            raise ValueError(f"task_options {sorted(options)} apply to built-in tasks only ({BUILTIN_TASKS}), "
                             f"not {spec!r}")
        return {}, feedback
    if feedback not in FEEDBACK_LEVELS:
        raise ValueError(f"task_options feedback must be one of {', '.join(FEEDBACK_LEVELS)}; got {feedback!r}")
    knobs = {name: _knob(spec, name, value) for name, value in options.items()}
    try:
        make_problems(spec, "train", 1, 0, at_most=True, **knobs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"task_options {knobs}: {exc}") from None
    return knobs, feedback


def _knob(spec: str, name: str, value):
    """`value` as the type of the generator's default for knob `name` (ValueError naming it otherwise)."""
    params = {k: p for k, p in inspect.signature(_GENERATORS[spec]).parameters.items() if k != "rng"}
    if name not in params:
        raise ValueError(f"task_options {name!r} is not a knob of task {spec!r} (knobs: "
                         f"{', '.join([*params, 'feedback'])})")
    kind = type(params[name].default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        return kind(value) if kind is str else kind(str(value).strip())
    except ValueError:
        raise ValueError(f"task_options {name} must be {'an integer' if kind is int else kind.__name__} for task "
                         f"{spec!r}, got {value!r}") from None


def check_task(spec: str, options: dict | None = None, data: Any = None) -> None:
    """Raise a ValueError naming the problem unless `spec` and its options name a loadable task; quick (no
    problem set is built) and torch-free, for checking a run before its model loads."""
    task_options(spec, options)
    if spec in BUILTIN_TASKS or spec == "humaneval":
        return
    kind, sep, path = spec.partition(":")
    if not (sep and kind in ("code", "math")):
        raise ValueError(f"task must be one of {BUILTIN_TASKS}, 'humaneval', 'code:PATH' or 'math:PATH', got {spec!r}")
    if not Path(path).exists():
        raise ValueError(f"task {spec!r}: no such file or directory {path}")
    if Path(path).is_file() and Path(path).suffix not in (".jsonl", *DATASET_SUFFIXES):
        raise ValueError(f"task {spec!r}: {path} is neither .jsonl nor a dataset file "
                         f"({', '.join(DATASET_SUFFIXES)}) nor a `save_to_disk` directory")


def load_task(spec: str, *, seed: int = 0, train_size: int = 2000, heldout_size: int = 200,
              options: dict | None = None, data: Any = None) -> Task:
    """A task by name: a built-in task ("arithmetic", "string", "code"), "humaneval", or "code:PATH" /
    "math:PATH" (a JSONL file of our schema, or a Hugging Face dataset read with the columns of `data`, a
    `DataOptions`). Built-in tasks take generator knobs in `options` (e.g. {"digits": 2}) and give up to
    `train_size` / `heldout_size` problems (fewer when fewer exist; batches cycle in epochs); files and
    HumanEval are split into train / held-out by a stable hash of each prompt (1 in 5 held out).
    `data.system_prompt`, when set, becomes every problem's system prompt.
    """
    check_task(spec, options, data)
    knobs, feedback = task_options(spec, options)
    if spec in BUILTIN_TASKS:
        task = Task(spec, make_problems(spec, "train", train_size, seed, at_most=True, **knobs),
                    make_problems(spec, "heldout", heldout_size, seed, at_most=True, **knobs),
                    task_env(spec, feedback))
    elif spec == "humaneval":
        task = _split("humaneval", load_humaneval(), CodeEnv())
    else:
        kind, _, path = spec.partition(":")
        env = CodeEnv() if kind == "code" else MathEnv()
        if Path(path).suffix == ".jsonl" and data is None:
            task = _split(spec, load_jsonl(path, kind), env)
        else:
            task = _split(spec, load_dataset_problems(path, kind, data), env)
    system = getattr(data, "system_prompt", None)
    if system:
        for problem in task.train + task.heldout:
            problem.setdefault("system", system)
    return task


def load_dataset_problems(path: str | Path, kind: str, data: Any = None) -> list[dict]:
    """Problems of `kind` ("math" or "code") from a Hugging Face dataset: a `save_to_disk` directory (a
    Dataset, or a DatasetDict whose `data.split` is read) or .parquet / .json / .jsonl / .csv files. Columns
    are mapped by `data` (a `DataOptions`: prompt, answer (math) or tests (code), optional system prompt)."""
    import datasets

    from sdpo_fast.train.config import DataOptions

    data = data or DataOptions()
    path = Path(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if data.split not in ds:
                raise ValueError(f"dataset {path} has splits {sorted(ds)}, not data.split={data.split!r}")
            ds = ds[data.split]
    else:
        builder = DATASET_SUFFIXES.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset file {path}: unknown format (known: {', '.join(DATASET_SUFFIXES)})")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    target = data.answer_column if kind == "math" else data.tests_column
    needed = [data.prompt_column, target] + ([data.system_prompt_column] if data.system_prompt_column else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {path} has no column(s) {missing} (columns: {ds.column_names}); map them with "
                         f"--data.prompt-column / --data.{'answer' if kind == 'math' else 'tests'}-column")
    problems = []
    for i, row in enumerate(ds):
        problem = {"prompt": row[data.prompt_column]}
        if kind == "math":
            problem["answer"] = str(row[target])
        else:
            tests = row[target]
            problem["tests"] = json.loads(tests) if isinstance(tests, str) else tests
        if data.system_prompt_column and row[data.system_prompt_column]:
            problem["system"] = row[data.system_prompt_column]
        if not isinstance(problem["prompt"], str) or not problem["prompt"].strip():
            raise ValueError(f"dataset {path}, row {i}: column {data.prompt_column!r} must be a non-empty string")
        if kind == "code":
            try:
                check_code_problem(problem)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"dataset {path}, row {i}: {exc}") from None
        problems.append(problem)
    return problems


def _split(name: str, problems: list[dict], env: Environment) -> Task:
    train = [p for p in problems if split_of(p["prompt"]) == "train"]
    heldout = [p for p in problems if split_of(p["prompt"]) == "heldout"]
    if not train or not heldout:
        raise ValueError(f"task {name!r} has too few problems ({len(problems)}) for a train / held-out split")
    return Task(name, train, heldout, env)
