"""The trainer end to end on a tiny random model: every algorithm and teacher mode, config errors,
a 2-rank FSDP2 (gloo) run, and an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from sdpo_fast.cli import parse
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.metrics import read_metrics
from tests.conftest import REPO

TINY = ["--model", "tiny-random", "--task", "arithmetic", "--prompts-per-step", "2", "--rollouts-per-prompt",
        "2", "--micro-batch-size", "3", "--sampling.max-new-tokens", "6", "--eval.problems", "2",
        "--env-workers", "1", "--optim.lr", "1e-3", "--optim.warmup-steps", "0"]


def tiny_config(tmp_path: Path, *extra: str) -> TrainConfig:
    return parse(TrainConfig, [*TINY, "--output-dir", str(tmp_path), *extra], prog="test")


class GradedEvaluator:
    """Stands in for the environment: a deterministic reward in [0, 1) spread over responses (so GRPO
    advantages are not all zero, unlike a tiny random model's arithmetic), feedback for the failures."""

    def evaluate(self, problems, responses):
        from sdpo_fast.envs import Evaluation

        rewards = [zlib.crc32(r.encode()) % 1000 / 1000 for r in responses]
        return [Evaluation(r, "" if r >= 0.5 else "Too low.") for r in rewards]

    def close(self):
        pass


def run_trainer(cfg: TrainConfig, graded: bool = True) -> dict:
    from sdpo_fast.train.trainer import Trainer

    return Trainer(cfg, evaluator=GradedEvaluator() if graded else None).fit()


@pytest.mark.parametrize("algorithm,teacher", [
    ("sdpo", "ema"), ("sdpo", "live"), ("sdpo", "frozen"), ("sdpo", "trust_region"), ("grpo", "ema"),
    ("blend", "live"),
])
def test_one_step_of_every_algorithm_and_teacher(tmp_path, algorithm, teacher):
    cfg = tiny_config(tmp_path, "--algorithm", algorithm, "--teacher", teacher, "--max-steps", "1")
    summary = run_trainer(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    step = records[1]
    for key in ("reward/mean", "loss", "eval/accuracy", "response/length_mean", "throughput/tokens_per_s",
                "time/generate_s", "time/evaluate_s", "time/score_s", "time/update_s", "grad_norm"):
        assert key in step, key
    assert step["grad_norm"] > 0  # the loss reached the weights
    # held-out accuracy before and after the step, returned and logged alike; graded rewards stay below 1,
    # and only a reward of 1 is a solved problem
    assert summary["eval/accuracy_before"] == records[0]["eval/accuracy"] == 0.0
    assert summary["eval/accuracy"] == step["eval/accuracy"] == 0.0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000001"  # the last step's


def test_sampled_token_sdpo_and_topk(tmp_path):
    cfg = tiny_config(tmp_path, "--max-steps", "1", "--algorithm", "sdpo_token", "--loss.alpha", "1",
                      "--teacher", "live")
    run_trainer(cfg)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["grad_norm"] > 0
    cfg = tiny_config(tmp_path / "topk", "--max-steps", "1", "--loss.topk", "5")
    run_trainer(cfg)
    assert read_metrics(tmp_path / "topk" / "metrics.jsonl")[-1]["grad_norm"] > 0


def test_metrics_only_run_writes_no_checkpoint_and_no_model(tmp_path):
    cfg = tiny_config(tmp_path, "--algorithm", "grpo", "--max-steps", "2", "--keep-checkpoints", "0",
                      "--no-export", "--optim.warmup-steps", "2")
    run_trainer(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    # the logged lr is the one each step used: warm-up lr * (s + 1) / (warmup + 1) for the s-th update
    assert [r["lr"] for r in records[1:]] == pytest.approx([1e-3 / 3, 2e-3 / 3])
    assert [r["samples"] for r in records[1:]] == [4, 8]
    for key in ("reward/std", "reward/min", "reward/max", "reward/zero_std_group_frac", "response/length_min",
                "response/length_max", "env/errors", "time/elapsed_s"):
        assert key in records[1], key
    assert records[2]["time/elapsed_s"] > records[1]["time/elapsed_s"] > 0
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("args,message", [
    (["--max-steps", "0"], "max_steps"),
    (["--optim.lr", "-1"], "optim.lr"),
    (["--loss.alpha", "2"], "alpha must be"),
    (["--algorithm", "sdpo_token", "--loss.alpha", "0.5"], "alpha=1"),
    (["--algorithm", "ppo"], "algorithm"),
    (["--keep-checkpoints", "0", "--save-every", "2"], "keep_checkpoints"),
])
def test_bad_config_fails_fast_with_a_clear_message(args, message, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        parse(TrainConfig, args, prog="sdpo-fast train")
    assert info.value.code != 0
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_config_file_with_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 7\noptim:\n  lr: 3.0e-4\nloss:\n  alpha: 1.0\n")
    cfg = parse(TrainConfig, ["--config", str(path), "--max-steps", "9"], prog="t")
    assert (cfg.max_steps, cfg.optim.lr, cfg.loss.alpha) == (9, 3e-4, 1.0)
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(SystemExit, match="optim.learning_rate"):
        parse(TrainConfig, ["--config", str(path)], prog="t")


def test_demo_config_is_valid_and_builds_its_task():
    from sdpo_fast.train.data import load_task

    cfg = parse(TrainConfig, ["--config", str(REPO / "configs" / "demo.yaml")], prog="t")
    assert cfg.model == "smollm2-135m" and cfg.reprompt.include_environment_feedback is False
    task = load_task(cfg.task, seed=cfg.seed, heldout_size=cfg.eval.problems, options=cfg.task_options)
    assert len(task.heldout) == cfg.eval.problems  # the demo evaluates every problem it asks for


def _torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sdpo_fast.cli", "train", *TINY, "--output-dir", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_rank_fsdp_run_and_exact_resume(tmp_path):
    full = tmp_path / "full"
    done = _torchrun(["--max-steps", "2", "--save-every", "1", "--prompts-per-step", "4"], full)
    assert done.returncode == 0, done.stderr[-4000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(full / "metrics.jsonl") if "loss" in r}
    assert set(losses) == {1, 2}

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000002")  # as if the run had died after step 1
    (resumed / "checkpoints" / "latest").write_text("step-00000001\n")
    again = _torchrun(["--max-steps", "2", "--save-every", "1", "--prompts-per-step", "4", "--resume"], resumed)
    assert again.returncode == 0, again.stderr[-4000:]
    records = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["loss"] == pytest.approx(losses[2], rel=1e-6, abs=1e-9)
    assert json.loads(json.dumps(records[-1]))["reward/mean"] == \
        [r for r in read_metrics(full / "metrics.jsonl") if r["step"] == 2][0]["reward/mean"]


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_kl_to_the_initial_model_matches_a_direct_formula_and_moves_the_gradient(tmp_path, kl_type):
    import dataclasses

    import torch

    from sdpo_fast.rollout import Rollouts
    from sdpo_fast.train.evaluate import prompt_ids
    from sdpo_fast.train.trainer import Trainer

    coef, temperature = 0.5, 0.7
    cfg = tiny_config(tmp_path, "--algorithm", "grpo", "--loss.kl-coef", str(coef), "--loss.kl-type", kl_type,
                      "--sampling.temperature", str(temperature))
    trainer = Trainer(cfg, evaluator=GradedEvaluator())
    lm, ref = trainer.policy.lm, trainer.ref_policy.lm
    torch.manual_seed(0)
    with torch.no_grad():  # the policy has moved away from its initial weights (the reference)
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    messages = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 17 - 4?"}]]
    prompts = [prompt_ids(trainer.tokenizer, m) for m in messages]
    responses = [[311, 12, 913], [14, 1500], [16, 17, 418, 19], [2000]]
    rewards = [1.0, 0.0, 0.5, 0.2]

    def step(kl_coef: float):
        trainer.loss_cfg = dataclasses.replace(cfg.loss, kl_coef=kl_coef)
        lm.zero_grad(set_to_none=True)
        metrics, _ = trainer._score_and_backward(messages, Rollouts(prompts, responses, [False] * 4, 2), rewards,
                                                 [""] * 4)
        return metrics, [p.grad.clone() for p in lm.parameters()]

    def token_logp(model, i):
        seq, start = prompts[i // 2] + responses[i], len(prompts[i // 2])
        logits = model(torch.tensor([seq])).logits[0].double() / temperature
        return logits.log_softmax(-1)[start - 1:-1].gather(-1, torch.tensor(responses[i])[:, None])[:, 0]

    with_kl, g_kl = step(coef)
    _, g_plain = step(0.0)
    lm.zero_grad(set_to_none=True)
    d = torch.cat([token_logp(ref, i).detach() - token_logp(lm, i) for i in range(4)])  # log p_ref - log p
    kl = -d if kl_type == "k1" else d.exp() - d - 1
    assert with_kl["loss/kl/mean"] == pytest.approx(float(kl.mean().detach()), rel=1e-4, abs=1e-6)
    assert float(kl.mean().detach()) != pytest.approx(0.0, abs=1e-4)
    (coef * kl.mean()).float().backward()  # token-mean: the KL term's share of the loss
    for a, b, p in zip(g_kl, g_plain, lm.parameters()):
        torch.testing.assert_close(a - b, p.grad, rtol=1e-3, atol=1e-6)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(g_kl, g_plain))  # the penalty changes the update


def test_state_dict_round_trip_gives_the_identical_next_step(tmp_path):
    """A deep copy of `state_dict()` after one step, loaded back after two more, replays the second step
    bit for bit: weights, EMA teacher, Adam moments, warm-up schedule, step and random generators."""
    import copy

    import torch

    from sdpo_fast.train.trainer import Trainer

    cfg = tiny_config(tmp_path, "--max-steps", "3", "--optim.warmup-steps", "3")
    trainer = Trainer(cfg, evaluator=GradedEvaluator())
    try:
        trainer.step = 1
        trainer.train_step()
        snapshot = copy.deepcopy(trainer.state_dict())
        trainer.step += 1
        first = trainer.train_step()
        weights = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        teacher = {k: v.clone() for k, v in trainer.teacher_policy.state_dict().items()}
        trainer.step += 1
        trainer.train_step()  # further away from the snapshot
        trainer.load_state_dict(copy.deepcopy(snapshot))
        assert trainer.step == 1
        trainer.step += 1
        again = trainer.train_step()
    finally:
        trainer.close()
    for key in ("loss", "grad_norm", "lr", "reward/mean", "response/length_mean"):
        assert again[key] == first[key], key
    assert all(torch.equal(v, weights[k]) for k, v in trainer.policy.state_dict().items())
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher_policy.state_dict().items())


def test_injected_evaluator_scores_every_response_and_is_closed(tmp_path, monkeypatch):
    import sdpo_fast.train.trainer as trainer_module

    class Recording(GradedEvaluator):
        def __init__(self):
            self.calls, self.closed = [], False

        def evaluate(self, problems, responses):
            out = super().evaluate(problems, responses)
            self.calls.append([e.reward for e in out])
            return out

        def close(self):
            self.closed = True

    def no_pool(*args, **kwargs):
        raise AssertionError("the trainer built an evaluator pool although one was given")

    monkeypatch.setattr(trainer_module, "BatchEvaluator", no_pool)
    evaluator = Recording()
    cfg = tiny_config(tmp_path, "--max-steps", "1", "--keep-checkpoints", "0", "--no-export")
    trainer_module.Trainer(cfg, evaluator=evaluator).fit()
    assert evaluator.closed
    # held-out before (2 problems), the step's 2 prompts x 2 rollouts, held-out after
    assert [len(c) for c in evaluator.calls] == [2, 4, 2]
    step = read_metrics(tmp_path / "metrics.jsonl")[1]
    assert step["reward/mean"] == pytest.approx(sum(evaluator.calls[1]) / 4)
