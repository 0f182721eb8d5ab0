"""Task loading and the deterministic batch order the trainer (and an exact resume) relies on."""

from __future__ import annotations

import json

import pytest

from sdpo_fast.train.data import load_task


def test_batches_are_a_pure_function_of_step_and_cover_an_epoch():
    task = load_task("arithmetic", seed=3, train_size=10, heldout_size=4)
    first = [task.batch(step, 4, seed=3) for step in (1, 2, 3)]
    assert first == [task.batch(step, 4, seed=3) for step in (1, 2, 3)]  # same args, same problems
    epoch = [p["prompt"] for b in first for p in b][:10]
    assert sorted(epoch) == sorted(p["prompt"] for p in task.train)  # the first 10 draws are one epoch
    assert task.batch(1, 4, seed=4) != first[0]
    assert not {p["prompt"] for p in task.train} & {p["prompt"] for p in task.heldout}


def test_task_options_and_messages():
    task = load_task("arithmetic", train_size=5, heldout_size=2, options={"digits": "3", "ops": "+"})
    problem = task.train[0]
    a, b = problem["prompt"].split("What is ")[1].split("?")[0].split(" + ")
    assert len(a) == len(b) == 3
    assert task.messages(problem) == [{"role": "user", "content": problem["prompt"]}]


def test_jsonl_tasks_and_errors(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}? Put it in \\\\boxed{{}}.",
                                        "answer": str(2 * i)}) + "\n" for i in range(40)))
    task = load_task(f"math:{path}")
    assert len(task.train) + len(task.heldout) == 40 and task.heldout
    with pytest.raises(ValueError, match="no such file"):
        load_task(f"math:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("chess")
    with pytest.raises(ValueError, match="built-in tasks only"):
        load_task(f"math:{path}", options={"digits": "2"})


def test_hugging_face_dataset_directory_and_parquet_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the `datasets` package (pip install 'sdpo-fast[data]')")
    from sdpo_fast.train.config import DataOptions

    rows = {"question": [f"What is {i} + {i}?" for i in range(30)], "solution": [2 * i for i in range(30)],
            "sys": ["Answer with a number." if i % 2 else "" for i in range(30)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    data = DataOptions(prompt_column="question", answer_column="solution", system_prompt_column="sys")
    task = load_task(f"math:{tmp_path / 'ds'}", data=data)
    problems = task.train + task.heldout
    assert len(problems) == 30 and task.heldout
    by_prompt = {p["prompt"]: p for p in problems}
    assert by_prompt["What is 3 + 3?"]["answer"] == "6"
    assert task.messages(by_prompt["What is 3 + 3?"]) == [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 3 + 3?"}]
    assert task.messages(by_prompt["What is 2 + 2?"]) == [{"role": "user", "content": "What is 2 + 2?"}]
    assert task.env.evaluate(by_prompt["What is 3 + 3?"], "\\boxed{6}").reward == 1.0

    code = {"text": [f"Print the number {i}." for i in range(30)],
            "cases": [[{"input": "", "output": f"{i}\n"}] for i in range(30)]}
    datasets.Dataset.from_dict(code).to_parquet(str(tmp_path / "code.parquet"))
    task = load_task(f"code:{tmp_path / 'code.parquet'}",
                     data=DataOptions(prompt_column="text", tests_column="cases", system_prompt="Use Python."))
    problem = (task.train + task.heldout)[0]
    assert problem["tests"][0]["input"] == "" and task.messages(problem)[0] == {"role": "system", "content": "Use Python."}

    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt', 'answer'\].*--data.prompt-column"):
        load_task(f"math:{tmp_path / 'ds'}")
    with pytest.raises(ValueError, match="splits"):
        load_task(f"math:{tmp_path / 'ds'}", data=DataOptions(prompt_column="question", answer_column="solution",
                                                                split="test"))
