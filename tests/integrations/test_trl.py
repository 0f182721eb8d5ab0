"""FusedSDPOTrainer against TRL's own SDPOTrainer (trl.experimental.sdpo), constructed offline.

The trainer is built from a tiny random model and the SmolLM2 tokenizer. Each case runs TRL's
`compute_loss` (materialised logits) and the fused one on the same trainer, batch and weights, and
compares the loss, the gradient of every parameter and the logged distillation metric. The last test
trains both trainers for two steps end to end (generation, rewards, reprompting, old log-probs, SGD)
and compares the logs and the trained weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="needs TRL (pip install 'sdpo-fast[trl]')")

from datasets import Dataset  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from sdpo_fast.integrations.trl import FusedSDPOTrainer  # noqa: E402
from sdpo_fast.models import load_tokenizer, tiny_random_model  # noqa: E402

B, P, P_T, T = 4, 6, 9, 7  # rollouts, prompt, teacher prompt and completion lengths


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return tiny_random_model(len(tokenizer), seed=0)


def _reward(completions, **kwargs):
    """Every other rollout succeeds, so each group of two has one demonstration."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def make_trainer(cls, model, tokenizer, tmp_path, **overrides):
    config = dict(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=2,
                  max_completion_length=T, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                  teacher_model_kind="live", logging_steps=1, seed=3)
    args = SDPOConfig(**{**config, **overrides})
    dataset = Dataset.from_dict({"prompt": ["What is 2+2?", "Name a colour.", "Say hi.", "Count to 3."]})
    trainer = cls(model=model, reward_funcs=_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; compute_loss divides by it
    return trainer


def make_inputs(vocab: int, seed: int, *, sd_mask=(1.0, 0.0, 1.0, 1.0)):
    """A TRL training batch: left-padded prompts, right-padded completions, teacher prompts of another length."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (B, n), generator=g)  # noqa: E731
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :3] = 0
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[2, 4:] = 0
    teacher_prompt_mask = torch.ones(B, P_T, dtype=torch.long)
    teacher_prompt_mask[0, :2] = 0
    completion_ids = ids(T)
    return {
        "prompt_ids": ids(P), "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([ids(P_T), completion_ids], 1),
        "teacher_attention_mask": torch.cat([teacher_prompt_mask, completion_mask], 1),
        "self_distillation_mask": torch.tensor(sd_mask),
        "advantages": torch.randn(B, generator=g),
    }


def loss_grads_metrics(compute_loss, trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = compute_loss(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_step(trainer, inputs):
    want = loss_grads_metrics(SDPOTrainer.compute_loss, trainer, inputs)
    got = loss_grads_metrics(FusedSDPOTrainer.compute_loss, trainer, inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-7, rtol=1e-4, msg=name)
    assert got[2].keys() == want[2].keys()
    for key in want[2]:
        assert got[2][key] == pytest.approx(want[2][key], rel=1e-5, abs=1e-6), key
    return want


def perturbed_teacher(model):
    """A separate teacher (as the EMA and base teachers are): the student's weights plus noise."""
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std())
    return teacher.requires_grad_(False).eval()


def with_old_logps(trainer, inputs, seed):
    """Rollout-time log-probs that differ from the current ones by up to +-1.5 nats, so the importance
    weight is clipped (at distillation_is_clip = 2) on some tokens and not on others."""
    full = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = trainer._forward_logits(trainer.model, full, mask, T)
        logp = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    g = torch.Generator().manual_seed(seed)
    return dict(inputs, old_per_token_logps=logp + 3.0 * (torch.rand(logp.shape, generator=g) - 0.5))


CASES = {
    "full-jsd-separate-teacher-is": dict(distillation_mode="full_logits", distillation_alpha=0.5, temperature=0.7),
    "full-forward-kl-live": dict(distillation_mode="full_logits", distillation_alpha=0.0),
    "topk-tail-jsd-separate-teacher-is": dict(distillation_mode="topk_logits", distillation_topk=5,
                                              distillation_add_tail=True, distillation_alpha=0.5),
    "topk-renormalised-reverse-kl-live": dict(distillation_mode="topk_logits", distillation_topk=5,
                                              distillation_add_tail=False, distillation_alpha=1.0, temperature=1.3),
    "sampled-token-separate-teacher-is": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    "blend-grpo-sequence-level": dict(distillation_mode="full_logits", distillation_alpha=0.5,
                                      distillation_weight=0.4, loss_type="grpo", importance_sampling_level="sequence"),
    "policy-only-dapo": dict(distillation_weight=0.0, loss_type="dapo", epsilon_high=0.28),
    "policy-only-dr-grpo": dict(distillation_weight=0.0, loss_type="dr_grpo"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_trl_step(case, base_model, tokenizer, tmp_path):
    trainer = make_trainer(FusedSDPOTrainer, copy.deepcopy(base_model), tokenizer, tmp_path, **CASES[case])
    trainer.model.train()
    if "separate-teacher" in case:
        trainer.teacher_model = perturbed_teacher(trainer.model)
    inputs = make_inputs(len(tokenizer), seed=len(case))
    if case.endswith("-is") or case.startswith(("blend", "policy")):
        inputs = with_old_logps(trainer, inputs, seed=len(case))
    loss, grads, _ = assert_same_step(trainer, inputs)
    assert loss.abs() > 0 and all(g.abs().sum() > 0 for g in grads.values())  # the comparison is not vacuous


def test_rows_without_teacher_give_zero_loss_and_gradients(base_model, tokenizer, tmp_path):
    trainer = make_trainer(FusedSDPOTrainer, copy.deepcopy(base_model), tokenizer, tmp_path,
                           distillation_mode="full_logits", distillation_alpha=0.5)
    trainer.model.train()
    loss, grads, metrics = assert_same_step(trainer, make_inputs(len(tokenizer), seed=1, sd_mask=(0.0,) * B))
    assert loss == 0 and all((g == 0).all() for g in grads.values())
    assert metrics["self_distillation/distillation_loss"] == 0.0


def test_config_errors_match_trl(base_model, tokenizer, tmp_path):
    trainer = make_trainer(FusedSDPOTrainer, copy.deepcopy(base_model), tokenizer, tmp_path,
                           distillation_mode="topk_logits", distillation_topk=5)
    trainer.args.distillation_topk = None
    with pytest.raises(ValueError, match="distillation_topk"):
        trainer.compute_loss(trainer.model, make_inputs(len(tokenizer), seed=2))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_two_training_steps_end_to_end_equal_trl(bf16, base_model, tokenizer, tmp_path):
    """generate -> reward -> reprompt -> loss -> SGD, twice on one generation batch (num_iterations=2, so
    the second step is off-policy: rollout log-probs from `_compute_rollout_logps`, clipped IS weights).

    With bf16 mixed precision TRL's LM head runs in bf16 under autocast and the fused op on bf16 copies of
    the hidden states and head: the two agree to bf16's precision, not float32's.
    """
    config = dict(max_steps=2, num_iterations=2, optim="sgd", learning_rate=500.0, distillation_mode="topk_logits",
                  distillation_topk=8, distillation_add_tail=True, distillation_alpha=0.5, temperature=0.9,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, bf16=bf16)
    rel, weight_tol = (2e-2, 2e-2) if bf16 else (1e-4, 1e-3)
    runs = {}
    for cls in (SDPOTrainer, FusedSDPOTrainer):
        trainer = make_trainer(cls, copy.deepcopy(base_model), tokenizer, tmp_path / cls.__name__, **config)
        trainer.train()
        runs[cls] = trainer
    trl, fused = runs[SDPOTrainer], runs[FusedSDPOTrainer]
    logs = [[entry for entry in t.state.log_history if "loss" in entry] for t in (trl, fused)]
    assert len(logs[0]) == len(logs[1]) == 2
    for want, got in zip(*logs):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), key
    assert logs[0][0]["self_distillation/reprompt_sample_fraction"] > 0
    with torch.no_grad():
        update = max(float((q - p0).abs().max()) for q, p0 in zip(trl.model.parameters(), base_model.parameters()))
        assert update > 1e-3  # the steps changed the weights
        for (name, p), q in zip(fused.model.named_parameters(), trl.model.parameters()):
            assert float((p - q).abs().max()) <= weight_tol * update, name
