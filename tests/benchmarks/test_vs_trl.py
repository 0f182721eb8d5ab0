"""benchmarks/vs_trl.py: both engines run the same setting, and TRL is configured to see what sdpo_fast sees.

A tiny random model (saved as a local directory, since TRL builds its EMA teacher from the model's path)
stands in for SmolLM2. The first test checks the mapping where it matters most: on the same rollouts and
rewards, TRL's teacher-context builder (configured by `trl_trainer`) and sdpo_fast's produce token-identical
teacher sequences and the same self-distillation mask. The second runs one step of each engine's child.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("trl", reason="needs TRL (pip install 'sdpo-fast[trl]')")

sys.path.insert(0, str(REPO / "benchmarks"))
import vs_trl  # noqa: E402

from sdpo_fast.algorithm import RepromptConfig, build_teacher_contexts  # noqa: E402
from sdpo_fast.models import load_model, load_tokenizer, tiny_random_model  # noqa: E402
from sdpo_fast.train.data import load_task  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer()
    tiny_random_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def setting(model_dir: str) -> vs_trl.Setting:
    return vs_trl.Setting(model=model_dir, steps=1, prompts=2, rollouts=4, micro_batch=4, max_new_tokens=5,
                          eval_problems=2, eval_every=1)


def test_teacher_contexts_are_token_identical(model_dir, tmp_path):
    s = setting(model_dir)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    task = load_task(s.task, seed=0, heldout_size=2, options=dict(s.task_options))
    trainer = vs_trl.trl_trainer(s, 0, tmp_path, model, tokenizer, task)
    problems = task.batch(1, s.prompts, 0)
    messages = [task.messages(p) for p in problems]
    # TRL also strips whitespace around a demonstration, sdpo_fast does not: real answers have none.
    texts = ["4", "Answer: 7", "The sum is 9.", "7 + 1 = 8\nAnswer: 8", "Answer: 3", "x", "2 - 1 = 1", "Answer: 6"]
    responses = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, responses))
    rewards = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # group 0: two successes; group 1: a lone one

    ours = build_teacher_contexts(tokenizer, [messages[i // 4] for i in range(8)], responses, rewards,
                                  [i // 4 for i in range(8)], [""] * 8,
                                  RepromptConfig(include_environment_feedback=False))
    completion_ids = torch.full((8, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(8, width, dtype=torch.long)
    for i, r in enumerate(responses):
        completion_ids[i, : len(r)] = torch.tensor(r)
        completion_mask[i, : len(r)] = 1
    theirs = trainer.teacher_context_builder.build(
        {"completion_ids": completion_ids, "completion_mask": completion_mask},
        [messages[i // 4] for i in range(8)], torch.tensor(rewards), feedbacks=[None] * 8)

    assert theirs["self_distillation_mask"].tolist() == ours.mask.tolist()
    assert ours.mask.tolist() == [1, 1, 1, 1, 1, 1, 1, 0]  # a lone success has no demonstration
    for k, row in enumerate(ours.rows):
        keep = theirs["teacher_attention_mask"][row].bool()
        assert theirs["teacher_input_ids"][row][keep].tolist() == ours.input_ids[k]


def test_one_step_of_each_engine(model_dir, tmp_path):
    s = setting(model_dir)
    for run in (vs_trl.run_sdpo_fast, vs_trl.run_trl):
        record = run(s, 0, tmp_path / run.__name__)
        json.dumps(record)
        assert [row["step"] for row in record["steps"]] == [1]
        row = record["steps"][0]
        assert row["generate_s"] > 0 and row["train_s"] > 0
        assert abs(row["generate_s"] + row["train_s"] - row["step_s"]) < 1e-6
        assert 0 < row["response_len"] <= s.max_new_tokens
        assert sorted(int(k) for k in record["eval"]) == [0, 1]
        assert record["peak_rss_mb"] > 0
