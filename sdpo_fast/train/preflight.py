"""`sdpo-fast preflight`: is a model/task in SDPO's regime? One sampled batch, no training.

Takes a training config (the same YAML and flags as `sdpo-fast train`), samples one step's rollouts,
scores them in the environment, builds the teacher contexts the trainer would build, scores student and
teacher (the initial model: what an EMA or frozen teacher is at step 1) with the fused op, and reports
the diagnostics of `sdpo_fast.algorithm.diagnostics` plus one the trainer cannot compute for free:

- `teacher/correct_answer_gain`: on failed rollouts whose answer could be located (direct-answer tasks),
  the wrong answer is replaced by the correct one, and both models score the result; the gain is the mean
  over those rollouts of sum_{answer tokens} log p_T - log p_S (nats). Positive: the teacher, in its
  context (demonstration and/or feedback), is more likely than the student to write the right answer at
  exactly the place where the student went wrong: the token-level signal SDPO relies on.
"""

from __future__ import annotations

import math

import torch

from sdpo_fast.algorithm import build_teacher_contexts
from sdpo_fast.algorithm.diagnostics import RolloutScores, answer_char_span, answer_token_mask, teacher_diagnostics
from sdpo_fast.algorithm.diagnostics import verdict
from sdpo_fast.distill import DistillOutput, linear_distill
from sdpo_fast.integrations.hf import completion_hidden, head_weight
from sdpo_fast.models import load_model, load_tokenizer
from sdpo_fast.rollout import generate
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.data import load_task
from sdpo_fast.train.evaluate import eos_ids, prompt_ids


@torch.no_grad()
def _score(model, cfg: TrainConfig, student: list[int], teacher: list[int], response: list[int]) -> DistillOutput:
    """Per-token outputs [T] of `response` after the student prompt and after the teacher prompt."""
    device = next(model.parameters()).device
    n = len(response)
    hidden = [completion_hidden(model, torch.tensor([ids + response], device=device), None, n)
              for ids in (student, teacher)]
    out = linear_distill(hidden[0], hidden[1], head_weight(model), torch.tensor([response], device=device),
                         alpha=cfg.loss.alpha, temperature=cfg.sampling.temperature, topk=cfg.loss.topk,
                         add_tail=cfg.loss.add_tail)
    return out.reshape(n)


def run_preflight(cfg: TrainConfig) -> dict[str, float]:
    """The diagnostics of one batch of `cfg` (prompts_per_step x rollouts_per_prompt rollouts of step 1)."""
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, seed=cfg.seed).to(device).eval()
    task = load_task(cfg.task, seed=cfg.seed, heldout_size=1, options=cfg.task_options, data=cfg.data)
    problems = task.batch(1, cfg.prompts_per_step, cfg.seed)
    messages = [task.messages(p) for p in problems]
    prompts = [prompt_ids(tokenizer, m) for m in messages]
    eos = eos_ids(tokenizer)
    rollouts = generate(model, prompts, cfg.rollouts_per_prompt, cfg.sampling, eos_token_ids=eos,
                        pad_token_id=tokenizer.pad_token_id, batch_size=cfg.generation_batch_size)
    responses = rollouts.responses
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    groups = [rollouts.group(i) for i in range(len(responses))]  # the prompt each rollout answers
    evals = [task.env.evaluate(problems[g], text) for g, text in zip(groups, texts)]
    rewards = [e.reward for e in evals]
    ctx = build_teacher_contexts(tokenizer, [messages[g] for g in groups], responses, rewards, groups,
                                 [e.feedback for e in evals], cfg.reprompt)

    scores: dict[int, RolloutScores] = {}
    gains, teacher_lp, student_lp = [], [], []
    for k, i in enumerate(ctx.rows):
        student_prompt, teacher_prompt = prompts[groups[i]], ctx.input_ids[k][: ctx.response_start[k]]
        out = _score(model, cfg, student_prompt, teacher_prompt, responses[i])
        answer = answer_token_mask(tokenizer, responses[i])
        scores[i] = RolloutScores(out.advantage.cpu(), out.divergence.cpu(), answer)
        correct = problems[groups[i]].get("answer")
        span = answer_char_span(texts[i])
        if ctx.success[i] or correct is None or span is None:
            continue
        fixed = tokenizer.encode(texts[i][: span[0]] + correct + texts[i][span[1]:], add_special_tokens=False)
        fixed += responses[i][-1:] if responses[i][-1] in eos else []
        mask = answer_token_mask(tokenizer, fixed)
        if not mask.any():
            continue
        cf = _score(model, cfg, student_prompt, teacher_prompt, fixed)
        teacher_lp.append(float(cf.teacher_logp.cpu()[mask].sum()))
        student_lp.append(float(cf.student_logp.cpu()[mask].sum()))
        gains.append(teacher_lp[-1] - student_lp[-1])

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {"rollouts": float(len(responses)), "reward/mean": mean(rewards),
            **{k: v for k, v in ctx.metrics().items() if k.endswith("fraction")},
            **teacher_diagnostics(scores, ctx.success, ctx.groups),
            "teacher/correct_answer_gain": mean(gains), "teacher/correct_answer_logp": mean(teacher_lp),
            "student/correct_answer_logp": mean(student_lp), "counterfactual_rollouts": float(len(gains))}


def print_report(cfg: TrainConfig, metrics: dict[str, float]) -> None:
    """The metrics, then the verdict with the reason behind each check."""
    print(f"pre-flight of {cfg.model} on {cfg.task} {cfg.task_options or ''}: {int(metrics['rollouts'])} rollouts "
          f"({cfg.prompts_per_step} prompts x {cfg.rollouts_per_prompt}), no training")
    for key, value in metrics.items():
        print(f"  {key:38s} {value:9.3f}")
    label, reasons = verdict(metrics)
    print(f"verdict: {label}")
    for reason in reasons:
        print(f"  - {reason}")
