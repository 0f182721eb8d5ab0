"""The training loop: rollouts -> environment -> teacher contexts -> shared-prefix scoring + fused loss ->
AdamW -> teacher update, with held-out evaluation, metrics, checkpoints and a Hugging Face export.

One process runs unsharded; under torchrun every rank takes its share of the step's prompts and the
model is sharded with FSDP2 (see `parallel.py`, which also holds the reductions over ranks). Phases are
timed (generate / evaluate / score / update / weight sync) and logged with the practitioner's metrics and
GPU telemetry every step. The trainer delegates: the step's batch layout to `batch.py`, the teacher's
inputs to `teaching.py`, checkpoints and the export to `checkpoint.py`, the run directory to `checks.py`.
Its `state_dict()` / `load_state_dict()` are everything the next step depends on (checkpoints and
test-time search use them).

Rollouts come from Hugging Face generate on the policy itself (on-policy), or from a colocated vLLM engine
(`rollout="vllm"`): the engine sleeps while the trainer scores and updates, gets the new weights after
every optimizer step, and its per-token log-probs become the loss's `old_logp`, the importance correction
of the mismatch between sampler and trainer (see docs/scaling.md).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from tqdm import tqdm

from sdpo_fast.algorithm import Aggregator, Teacher, TokenBatch, compute_loss, grpo_advantages
from sdpo_fast.algorithm.metrics import Metrics
from sdpo_fast.distill import IGNORE_INDEX
from sdpo_fast.envs import BatchEvaluator
from sdpo_fast.models import check_model, load_model, load_tokenizer
from sdpo_fast.rollout import Rollouts, VLLMRollout, generate, require_vllm
from sdpo_fast.train.batch import collate
from sdpo_fast.train.checkpoint import RANK_STATE, Checkpointer, export_model
from sdpo_fast.train.checks import check_output_dir, record_config
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.data import Task, check_task, load_task
from sdpo_fast.train.evaluate import eos_ids, heldout_correct, prompt_ids
from sdpo_fast.train.metrics import MetricsWriter, plot_metrics, rollout_metrics
from sdpo_fast.train.parallel import (Runtime, barrier, concat_over_ranks, full_weights, init_runtime,
                                      mean_over_ranks, shard_model, sum_over_ranks, union_over_ranks)
from sdpo_fast.train.policy import Policy, quiet_cache_warning
from sdpo_fast.train.rng import rng_state, seed_everything, set_rng_state
from sdpo_fast.train.teaching import TeacherInputs
from sdpo_fast.train.telemetry import GPUTelemetry

log = logging.getLogger(__name__)


class Trainer:
    """One training run of `cfg` (see the module docstring).

    task: the problems and environment to use instead of loading `cfg.task`. evaluator: scores responses
    (anything with `evaluate(problems, responses) -> list[Evaluation]` and `close()`) instead of a process
    pool over the task's environment; the trainer closes it when `fit` ends or on `close()`.
    """

    def __init__(self, cfg: TrainConfig, task: Task | None = None, evaluator: Any = None):
        check_model(cfg.model)  # before anything loads (the output directory is checked by `fit`)
        if task is None:
            check_task(cfg.task, cfg.task_options, cfg.data)
        self.cfg = cfg
        self.rt: Runtime = init_runtime(cfg.device)
        if cfg.rollout == "vllm":
            require_vllm(self.rt.device)  # before any model is loaded
        if cfg.prompts_per_step % self.rt.world_size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the world size "
                             f"{self.rt.world_size}")
        self.out = Path(cfg.output_dir)
        self.checkpoints = Checkpointer(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        seed_everything(cfg.seed + self.rt.rank)
        self.loss_cfg = cfg.loss
        self.tokenizer = load_tokenizer(cfg.model)
        self.task: Task = task or load_task(cfg.task, seed=cfg.seed, heldout_size=max(cfg.eval.problems, 1),
                                            options=cfg.task_options, data=cfg.data)
        self.sampling = cfg.sampling
        self.reprompt = cfg.reprompt
        self.eos = eos_ids(self.tokenizer)

        lm = load_model(cfg.model, seed=cfg.seed).to(self.rt.device)
        teacher_lm = ref_lm = None
        if self.loss_cfg.uses_teacher and cfg.teacher != "live":
            teacher_lm = copy.deepcopy(lm)  # before sharding, so both shard alike
        # KL reference: the frozen initial model; the frozen and trust-region teachers already hold it
        shares_reference = teacher_lm is not None and cfg.teacher in ("frozen", "trust_region")
        if self.loss_cfg.kl_coef > 0 and not shares_reference:
            ref_lm = copy.deepcopy(lm).requires_grad_(False)
        self.policy = self._wrap(lm, reuse_kv=not cfg.activation_checkpointing)
        self.teacher_policy = self._wrap(teacher_lm, reuse_kv=False) if teacher_lm is not None else None
        self.ref_policy: Policy | None = None
        if self.loss_cfg.kl_coef > 0:
            self.ref_policy = self.teacher_policy if shares_reference else self._wrap(ref_lm, reuse_kv=False)
        self.teacher = (Teacher(cfg.teacher, self.policy.lm, tau=cfg.tau,
                                model=self.teacher_policy.lm if self.teacher_policy else None)
                        if self.loss_cfg.uses_teacher else None)

        o = cfg.optim
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=o.lr,
                                           betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (o.warmup_steps + 1)) if o.warmup_steps else 1.0)
        self.evaluator = evaluator if evaluator is not None else BatchEvaluator(
            self.task.env, workers=cfg.env_workers, timeout_s=cfg.env_timeout_s)
        self.telemetry = GPUTelemetry(self.rt.device, self.rt.rank)
        self.vllm: VLLMRollout | None = None
        if cfg.rollout == "vllm":
            v = cfg.vllm
            self.vllm = VLLMRollout(self.policy.lm, device=self.rt.device, seed=cfg.seed + self.rt.rank,
                                    gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
                                    dtype=v.dtype, enforce_eager=v.enforce_eager, sleep=v.sleep)
            self._sync_rollout_weights()
            self.vllm.sleep()  # keeps a CPU copy: evaluation and the first step's scoring need the GPU memory
        self.step = 0
        self.started = time.perf_counter()
        self.elapsed_before = 0.0  # training time of the run before a resume

    def _wrap(self, lm, reuse_kv: bool) -> Policy:
        policy = Policy(lm, share_prefix=self.cfg.share_prefix, reuse_prefix_kv=reuse_kv)
        shard_model(policy, lm, self.rt, mixed_precision=self.cfg.mixed_precision,
                    activation_checkpointing=self.cfg.activation_checkpointing)
        if self.rt.mesh is not None:
            for method in ("generate", "hidden"):
                register_fsdp_forward_method(policy, method)
        return policy

    def close(self) -> None:
        """Close the evaluator and the vLLM engine (`fit` does it when it ends)."""
        self.evaluator.close()
        if self.vllm is not None:
            self.vllm.close()

    # ----------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train for `max_steps`, evaluating before and after; returns the final metrics."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.started = time.perf_counter()
        if self.rt.is_main:
            check_output_dir(cfg)
        if cfg.resume:
            self._resume()
        if self.rt.is_main:
            record_config(cfg, self.step)
        barrier()
        writer = MetricsWriter(self.out / "metrics.jsonl", tensorboard_dir=self.out / "tensorboard",
                               resume_step=self.step if cfg.resume else None) if self.rt.is_main else None
        summary: dict = {}
        if self.step == 0:
            summary["eval/accuracy_before"] = acc = self.evaluate()
            if writer:
                writer.log(0, {"eval/accuracy": acc})
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{cfg.algorithm} on {self.task.name}",
                   disable=not self.rt.is_main, unit="step", dynamic_ncols=True)
        try:
            while self.step < cfg.max_steps:
                self.step += 1
                metrics = self.train_step()
                last = self.step == cfg.max_steps
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    metrics["eval/accuracy"] = self.evaluate()
                if writer:
                    writer.log(self.step, metrics)
                if cfg.keep_checkpoints and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                    self.save()
                bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", loss=f"{metrics['loss']:.3f}",
                                **({"acc": f"{metrics['eval/accuracy']:.2f}"} if "eval/accuracy" in metrics else {}))
                bar.update(1)
                summary.update(metrics)
        finally:  # also on Ctrl-C or an error: the bar's last line ends before any message
            bar.close()
        if cfg.export:
            self.export()
        if writer:
            writer.close()
            plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png",
                         title=f"{self.out.name}: {cfg.algorithm} on {self.task.name}, {cfg.model}")
        return summary

    # ----------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on this rank's share of the step's prompts; returns the step's metrics."""
        cfg, G = self.cfg, self.cfg.rollouts_per_prompt
        self.telemetry.begin()
        t0 = time.perf_counter()
        per_rank = cfg.prompts_per_step // self.rt.world_size
        problems = self.task.batch(self.step, cfg.prompts_per_step, cfg.seed)
        problems = problems[self.rt.rank * per_rank:(self.rt.rank + 1) * per_rank]
        messages = [self.task.messages(p) for p in problems]
        rollouts = self._generate([prompt_ids(self.tokenizer, m) for m in messages])
        t_gen = time.perf_counter()

        texts = self.tokenizer.batch_decode(rollouts.responses, skip_special_tokens=True)
        evals = self.evaluator.evaluate([problems[rollouts.group(i)] for i in range(len(texts))], texts)
        rewards = [e.reward for e in evals]
        t_env = time.perf_counter()

        loss_metrics, loss_value = self._score_and_backward(messages, rollouts, rewards, [e.feedback for e in evals])
        t_score = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses (the scheduler then moves on)
        grad_norm = self._optimizer_step()
        t_update = time.perf_counter()
        self._sync_rollout_weights()
        t_end = time.perf_counter()

        lengths = [len(r) for r in rollouts.responses]
        tokens = sum(lengths) + sum(len(s) for s in rollouts.prompts) * G
        metrics = mean_over_ranks({"loss": loss_value, **loss_metrics}, self.rt.device)
        errors = ["error" in e.details for e in evals]
        rows = concat_over_ranks(list(zip(rewards, lengths, rollouts.truncated, errors)))  # one gather
        metrics.update(rollout_metrics(*map(list, zip(*rows)), G, cfg.reprompt.success_reward_threshold))
        metrics.update({
            "grad_norm": float(grad_norm),
            "lr": lr,
            "samples": self.step * cfg.prompts_per_step * G,
            "time/elapsed_s": self._elapsed(),
            "throughput/tokens_per_s": sum_over_ranks(tokens, self.rt.device) / (t_end - t0),
            "time/generate_s": t_gen - t0,
            "time/evaluate_s": t_env - t_gen,
            "time/score_s": t_score - t_env,
            "time/update_s": t_update - t_score,
            "time/step_s": t_end - t0,
            **({"time/weight_sync_s": t_end - t_update} if self.vllm is not None else {}),
            **union_over_ranks(self.telemetry.end()),
        })
        return metrics

    def update(self, messages, prompts, responses, rewards, feedback) -> dict:
        """One optimizer step on given rollouts (rollout i answers prompts[i // rollouts_per_prompt], whose
        chat is messages[...]): teacher contexts, scoring, loss, AdamW, teacher update. Returns the loss
        metrics with "loss" and "grad_norm". Test-time self-distillation calls it on its own rollouts."""
        if len(responses) != len(prompts) * self.cfg.rollouts_per_prompt or len(messages) != len(prompts):
            raise ValueError(f"update needs rollouts_per_prompt={self.cfg.rollouts_per_prompt} responses per "
                             f"prompt and one chat per prompt, got {len(responses)} responses, {len(prompts)} "
                             f"prompts, {len(messages)} chats")
        rollouts = Rollouts(prompts, responses, [False] * len(responses), self.cfg.rollouts_per_prompt)
        metrics, loss = self._score_and_backward(messages, rollouts, rewards, feedback)
        grad_norm = float(self._optimizer_step())
        self._sync_rollout_weights()
        return {**metrics, "loss": loss, "grad_norm": grad_norm}

    def _generate(self, prompts: list[list[int]]) -> Rollouts:
        """This rank's rollouts: vLLM (then put to sleep until the next weight push) or HF generate."""
        G = self.cfg.rollouts_per_prompt
        if self.vllm is not None:
            rollouts = self.vllm.generate(prompts, G, self.sampling, eos_token_ids=self.eos)
            self.vllm.sleep(discard_weights=True)  # `_sync_rollout_weights` reloads them after the update
            return rollouts
        with quiet_cache_warning():
            rollouts = generate(self.policy, prompts, G, self.sampling, eos_token_ids=self.eos,
                                pad_token_id=self.tokenizer.pad_token_id, batch_size=self.cfg.generation_batch_size)
        _reshard(self.policy)
        return rollouts

    def _score_and_backward(self, messages, rollouts: Rollouts, rewards, feedback) -> tuple[dict, float]:
        """Teacher contexts, micro-batched scoring with the fused op, and backward; returns (metrics, loss).

        `rollouts.logprobs`: the sampler's per-token log-probs of each response (vLLM), the loss's
        `old_logp`; None: the responses are on-policy (HF generate from this very policy).
        """
        cfg, lcfg, dev = self.cfg, self.loss_cfg, self.rt.device
        batch = collate(rollouts, self.rt.rank)
        teacher = (TeacherInputs(self.teacher, self.policy, self.teacher_policy, self.tokenizer, self.reprompt,
                                 messages, batch, rewards, feedback) if self.teacher is not None else None)
        sd_mask = teacher.contexts.mask if teacher is not None else None
        mask = lcfg.loss_mask(batch.response_mask, sd_mask)
        group = dist.group.WORLD if self.rt.world_size > 1 else None
        agg = Aggregator.for_batch(mask, lcfg.agg_mode, norm_length=cfg.sampling.max_new_tokens, process_group=group)
        advantages = (grpo_advantages(rewards, batch.groups, norm_by_std=lcfg.grpo_norm_by_std)
                      if lcfg.uses_group_advantage else None)
        targets = torch.where(mask, batch.targets, IGNORE_INDEX).to(dev)
        distill = dict(temperature=cfg.sampling.temperature, **lcfg.distill_kwargs())

        metrics, total = Metrics(), 0.0
        for rows in batch.micro_batches(cfg.micro_batch_size):
            seqs, starts = batch.sequences(rows), batch.starts(rows)
            teacher_batch = teacher.batch(rows) if teacher is not None else None
            out = self.policy(seqs, starts, targets[rows], teacher_batch, distill)
            common = dict(advantages=_rows(advantages, rows, dev), old_logp=_rows(batch.old_logp, rows, dev),
                          ref_logp=self._reference_logp(seqs, starts, targets[rows], distill["temperature"]))
            if teacher is None:
                token_batch = TokenBatch(mask=mask[rows].to(dev), student_logp=out.logp, entropy=out.entropy,
                                         **common)
            else:
                token_batch = TokenBatch.from_distill(out, mask[rows].to(dev), sd_mask=sd_mask[rows].to(dev),
                                                      **common)
                teacher.diagnostics.add(rows, out, token_batch.mask)
            loss = compute_loss(lcfg, agg, token_batch, metrics)
            if token_batch.old_logp is not None:
                metrics.add("rollout/logp_abs_diff", (token_batch.student_logp - token_batch.old_logp).abs(),
                            token_batch.mask)
            loss.backward()
            total += float(loss.detach())
        if self.teacher_policy is not None:
            _reshard(self.teacher_policy)
        if self.ref_policy is not None and self.ref_policy is not self.teacher_policy:
            _reshard(self.ref_policy)
        if teacher is None:
            return metrics.summary(), total
        return {**teacher.contexts.metrics(), **metrics.summary(), **teacher.diagnostics.metrics()}, total

    @torch.no_grad()
    def _reference_logp(self, seqs, starts, targets: torch.Tensor, temperature: float) -> torch.Tensor | None:
        """log p_ref(y_t) of the sampled tokens under the frozen initial model (at the sampling temperature, as
        the policy's), for the KL penalty; None without one."""
        if self.ref_policy is None:
            return None
        return self.ref_policy(seqs, starts, targets, None, {"temperature": temperature}).logp

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, schedule, zero the gradients, move the teacher; returns the pre-clip grad norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            self.teacher.after_step()
        return grad_norm

    def _sync_rollout_weights(self) -> None:
        """Push the policy's weights into the vLLM engine, one gathered parameter at a time (no-op with HF)."""
        if self.vllm is not None:
            self.vllm.load_weights(full_weights(self.policy.lm, dtype=getattr(torch, self.cfg.vllm.dtype)))

    # ----------------------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Held-out accuracy on the first `eval.problems` held-out problems (each rank answers a share)."""
        cfg = self.cfg
        problems = self.task.heldout[: cfg.eval.problems]
        correct = heldout_correct(
            self.policy, self.tokenizer, self.task, problems[self.rt.rank::self.rt.world_size], self.evaluator,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
            batch_size=cfg.generation_batch_size)
        _reshard(self.policy)
        return sum_over_ranks(correct, self.rt.device) / max(len(problems), 1)

    # ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on: "model", "optim", "scheduler" and, with a teacher of its own
        weights, "teacher" (DCP state dicts, sharded under FSDP2), and under RANK_STATE this rank's step,
        training time so far and random-generator states. Tensors may share storage with the live ones (as
        `nn.Module.state_dict`'s do): deep-copy the dict to keep a snapshot. Call on every rank."""
        unstepped = not self.optimizer.state
        optim = get_optimizer_state_dict(self.policy, self.optimizer)
        if unstepped:  # reading it gave the optimizer a zero step (step count 1), which would change the first
            self.optimizer.state.clear()  # update's bias correction: an unstepped optimizer stays without state
            optim["state"] = {}
        state = {"model": get_model_state_dict(self.policy), "optim": optim, "scheduler": self.scheduler.state_dict()}
        if self.teacher_policy is not None:
            state["teacher"] = get_model_state_dict(self.teacher_policy)
        state[RANK_STATE] = {"step": self.step, "elapsed_s": self._elapsed(), **rng_state()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (of this run or an identically configured one): weights, optimizer
        (gradients dropped), scheduler, teacher, step, training time and random generators; the rollout
        engine gets the weights. Call on every rank."""
        set_model_state_dict(self.policy, state["model"])
        set_optimizer_state_dict(self.policy, self.optimizer, state["optim"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher_policy is not None:
            set_model_state_dict(self.teacher_policy, state["teacher"])
        progress = state[RANK_STATE]
        set_rng_state(progress)
        self.step = progress["step"]
        self.elapsed_before = progress.get("elapsed_s", 0.0)
        self.started = time.perf_counter()
        self._sync_rollout_weights()

    def save(self) -> Path:
        """A checkpoint of the current state under output_dir/checkpoints; returns its directory."""
        return self.checkpoints.save(self.step, self.state_dict())

    def _resume(self) -> None:
        state = self.state_dict()
        # the loading template needs the optimizer's state tensors: reading them initialises an unstepped
        # optimizer's (the checkpoint then overwrites them)
        state["optim"] = get_optimizer_state_dict(self.policy, self.optimizer)
        path = self.checkpoints.load_latest(state)
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> Path:
        """The trained model as a Hugging Face directory (output_dir/model), written atomically."""
        return export_model(self.policy.lm, self.tokenizer, self.out / "model")

    def _elapsed(self) -> float:
        """Training time of the run so far, resumed runs included."""
        return self.elapsed_before + time.perf_counter() - self.started


def _rows(values: torch.Tensor | None, rows: list[int], device: torch.device) -> torch.Tensor | None:
    return values[rows].to(device) if values is not None else None


def _reshard(policy: Policy) -> None:
    """Return FSDP2 parameters to their shards after a forward without backward (generation, teacher
    scoring): the root group stays gathered after forward by design, which would leave full tensors
    behind for the EMA update and the checkpoint."""
    if isinstance(policy, FSDPModule):
        policy.reshard()
