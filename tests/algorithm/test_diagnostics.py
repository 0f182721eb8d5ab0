"""Self-teacher diagnostics (sdpo_fast.algorithm.diagnostics) on hand-checked cases, and the trainer's hook."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast.algorithm.diagnostics import (
    RolloutScores,
    answer_char_span,
    answer_token_mask,
    group_auc,
    teacher_diagnostics,
    verdict,
)
from sdpo_fast.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_group_auc_hand_checked():
    # group 0: success 3.0 vs failures 1.0 (win) and 3.0 (tie) -> 1.5 / 2; group 1: success 0.0 vs failure
    # 2.0 (loss) -> 0 / 1. Across groups 5.0 > 0.0 would be a win, but cross-group pairs do not count.
    scores = [3.0, 1.0, 3.0, 0.0, 2.0, 5.0]
    success = [True, False, False, True, False, False]
    groups = [0, 0, 0, 1, 1, 2]
    assert group_auc(scores, success, groups) == pytest.approx(1.5 / 3)
    assert group_auc([1.0, 2.0], [True, False], [0, 1]) != group_auc([1.0, 2.0], [True, False], [0, 0])
    assert math.isnan(group_auc([1.0, 2.0], [True, False], [0, 1]))
    assert group_auc([2.0, 1.0, 0.5], [True, False, False], [0, 0, 0]) == 1.0


def test_answer_span_and_tokens(tokenizer):
    text = "7 + 5 = 12, so\nAnswer: 13"
    start, end = answer_char_span(text)
    assert text[start:end] == "13"
    assert answer_char_span("I think it is 4 or 15.") == (19, 21)
    assert answer_char_span("no idea") is None
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    mask = answer_token_mask(tokenizer, ids)
    assert mask.shape == (len(ids),) and not mask[-1]  # the EOS decodes to nothing
    picked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "13" in picked and "12" not in picked and "Answer" not in picked
    assert not answer_token_mask(tokenizer, tokenizer.encode("no idea", add_special_tokens=False)).any()


def test_teacher_diagnostics_hand_checked():
    t = torch.tensor
    # rollouts 0-1: group 0 (0 succeeds); 2-3: group 1, both failed, only 2 has a teacher (feedback).
    scores = {
        0: RolloutScores(t([0.5, 0.5, 1.0]), t([0.1, 0.1, 0.2]), t([False, False, True])),
        1: RolloutScores(t([0.0, -2.0]), t([0.1, 0.6]), t([False, True])),
        2: RolloutScores(t([0.2, -1.0, -3.0]), t([0.0, 0.3, 0.7]), t([False, True, True])),
    }
    m = teacher_diagnostics(scores, success=[True, False, False, False], groups=[0, 0, 1, 1])
    assert m["teacher/seq_adv_auc"] == 1.0  # 2.0 > -2.0 within group 0; group 1 has no success
    assert m["teacher/seq_adv_success"] == pytest.approx(2.0)
    assert m["teacher/seq_adv_failed"] == pytest.approx((-2.0 - 3.8) / 2)
    assert m["teacher/answer_adv_failed"] == pytest.approx((-2.0 + (-2.0)) / 2)  # rollout 2: mean(-1, -3)
    assert m["teacher/answer_adv_success"] == pytest.approx(1.0)
    assert m["teacher/answer_div_share"] == pytest.approx((0.2 + 0.6 + 1.0) / 2.1)
    assert m["teacher/answer_token_share"] == pytest.approx(4 / 8)
    assert m["teacher/answer_abs_adv_share"] == pytest.approx((1.0 + 2.0 + 4.0) / (2.0 + 2.0 + 4.2))
    assert m["teacher/answer_div_concentration"] == pytest.approx((1.8 / 2.1) / 0.5)
    assert m["groups/all_failed_frac"] == 0.5
    assert m["teacher/all_failed_teacher_frac"] == 0.5
    assert m["teacher/all_failed_div"] == pytest.approx(1.0 / 3)


def test_verdict():
    good = {"teacher/seq_adv_auc": 0.8, "teacher/correct_answer_gain": 2.0, "teacher/answer_div_share": 0.5}
    assert verdict(good)[0] == "in regime"
    assert verdict({**good, "teacher/seq_adv_auc": 0.5})[0] == "marginal"
    label, reasons = verdict({"teacher/seq_adv_auc": float("nan")})
    assert label == "not in regime" and "undefined" in reasons[0]


def test_trainer_logs_diagnostics(tmp_path):
    from sdpo_fast.rollout.sampling import SamplingConfig
    from sdpo_fast.train.config import EvalOptions, TrainConfig
    from sdpo_fast.train.trainer import Trainer

    cfg = TrainConfig(model="tiny-random", task="arithmetic", max_steps=1, prompts_per_step=2, rollouts_per_prompt=2,
                      output_dir=tmp_path, keep_checkpoints=0, export=False, device="cpu", env_workers=1,
                      task_options={"digits": "1", "feedback": "answer"},
                      sampling=SamplingConfig(max_new_tokens=6), eval=EvalOptions(problems=0))
    trainer = Trainer(cfg)
    try:
        metrics = trainer.train_step()
    finally:
        trainer.evaluator.close()
    # a random model fails everything: every group is all-failed and every rollout gets the feedback
    assert metrics["groups/all_failed_frac"] == 1.0
    assert metrics["teacher/all_failed_teacher_frac"] == 1.0
    assert metrics["teacher/all_failed_div"] > 0
    assert math.isnan(metrics["teacher/seq_adv_auc"])


def test_preflight_counterfactual_gain_against_plain_logits(monkeypatch, tokenizer):
    """One prompt, two rollouts: 'Answer: <right>' and 'Answer: <wrong>'. The failed one's counterfactual is
    the successful text; its gain must equal sum over the answer tokens of log p_T - log p_S computed
    from the model's full logits (float64) after the teacher prompt and after the student prompt."""
    import sdpo_fast.train.preflight as pf
    from sdpo_fast.models import load_model
    from sdpo_fast.rollout import Rollouts
    from sdpo_fast.rollout.sampling import SamplingConfig
    from sdpo_fast.train.config import TrainConfig
    from sdpo_fast.train.data import load_task
    from sdpo_fast.train.evaluate import prompt_ids

    cfg = TrainConfig(model="tiny-random", task="arithmetic", prompts_per_step=1, rollouts_per_prompt=2,
                      device="cpu", task_options={"digits": "1", "feedback": "answer"},
                      sampling=SamplingConfig(max_new_tokens=8, temperature=0.7))
    problem = load_task("arithmetic", seed=0, heldout_size=1, options={"digits": 1}).batch(1, 1, 0)[0]
    right, wrong = problem["answer"], str(int(problem["answer"]) + 1)
    eos = tokenizer.eos_token_id
    texts = [f"Answer: {right}", f"Answer: {wrong}"]
    responses = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
    monkeypatch.setattr(pf, "generate", lambda model, prompts, *a, **k: Rollouts(prompts=prompts, responses=responses,
                                                                  truncated=[False, False], n=2))
    metrics = pf.run_preflight(cfg)
    assert metrics["reward/mean"] == 0.5 and metrics["counterfactual_rollouts"] == 1.0

    model = load_model("tiny-random").double()
    student = prompt_ids(tokenizer, [{"role": "user", "content": problem["prompt"]}])
    demo = f"{problem['prompt']}\nCorrect solution:\n\n{texts[0]}\n\nCorrectly solve the original question."
    teacher = prompt_ids(tokenizer, [{"role": "user", "content": demo}])
    fixed = responses[0]
    mask = answer_token_mask(tokenizer, fixed)

    def answer_logp(prefix):
        logits = model(torch.tensor([prefix + fixed])).logits[0, len(prefix) - 1:-1] / 0.7
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(fixed)[:, None])[:, 0]
        return float(logp[mask].sum())

    with torch.no_grad():
        expected = answer_logp(teacher) - answer_logp(student)
    assert metrics["teacher/correct_answer_gain"] == pytest.approx(expected, abs=1e-4)
    assert math.isnan(metrics["teacher/seq_adv_auc"])  # a lone success has no teacher, so no pair
