"""The training loop: rollouts -> environment -> teacher contexts -> shared-prefix scoring + fused loss ->
AdamW -> teacher update, with held-out evaluation, metrics, checkpoints and a Hugging Face export.

One process runs unsharded; under torchrun every rank takes its share of the step's prompts and the
model is sharded with FSDP2 (see `parallel.py`). Phases are timed (generate / evaluate / score /
update / weight sync) and logged with the practitioner's metrics and GPU telemetry every step.

Rollouts come from Hugging Face generate on the policy itself (on-policy), or from a colocated vLLM engine
(`rollout="vllm"`): the engine sleeps while the trainer scores and updates, gets the new weights after
every optimizer step, and its per-token log-probs become the loss's `old_logp`, the importance correction
of the mismatch between sampler and trainer (see docs/scaling.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from tqdm import tqdm

from sdpo_fast.algorithm import Aggregator, Teacher, TokenBatch, build_teacher_contexts
from sdpo_fast.algorithm import compute_loss, grpo_advantages
from sdpo_fast.algorithm.diagnostics import TeacherDiagnostics
from sdpo_fast.algorithm.metrics import Metrics
from sdpo_fast.envs import BatchEvaluator
from sdpo_fast.files import write_atomically
from sdpo_fast.models import check_model, load_model, load_tokenizer
from sdpo_fast.rollout import Rollouts, VLLMRollout, generate, require_vllm
from sdpo_fast.train import checkpoint
from sdpo_fast.train.checks import RUN_FILES, check_output_dir
from sdpo_fast.train.config import TrainConfig, from_dict, to_dict
from sdpo_fast.train.data import Task, check_task, load_task
from sdpo_fast.train.evaluate import eos_ids, heldout_correct, prompt_ids
from sdpo_fast.train.metrics import MetricsWriter, plot_metrics
from sdpo_fast.train.parallel import Runtime, full_tensor, full_weights, init_runtime, shard_model
from sdpo_fast.train.policy import Policy, TeacherBatch, quiet_cache_warning
from sdpo_fast.train.telemetry import GPUTelemetry

log = logging.getLogger(__name__)
IGNORE = -100


class Trainer:
    """One training run of `cfg` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, task: Task | None = None):
        """`task`: the problems and environment to use instead of loading `cfg.task`."""
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
        self.ckpt_dir = self.out / "checkpoints"
        _seed_everything(cfg.seed + self.rt.rank)
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
        self.evaluator = BatchEvaluator(self.task.env, workers=cfg.env_workers, timeout_s=cfg.env_timeout_s)
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

    # ----------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train for `max_steps`, evaluating before and after; returns the final metrics."""
        try:
            return self._fit()
        finally:
            self.evaluator.close()
            if self.vllm is not None:
                self.vllm.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.started = time.perf_counter()
        if self.rt.is_main:
            check_output_dir(cfg)
        if cfg.resume:
            self._resume()
        if self.rt.is_main:
            self._record_config()
        self._barrier()
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

    def _record_config(self) -> None:
        """Write output_dir/config.yaml (what `--resume` restores). A new run with --overwrite first deletes the
        previous run's files; a resumed run whose settings changed appends the changes, with the step they
        apply from, to config_changes.jsonl."""
        cfg, saved = self.cfg, self.out / "config.yaml"
        if cfg.overwrite and not cfg.resume:
            for name in RUN_FILES:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        current = to_dict(dataclasses.replace(cfg, resume=False, overwrite=False))
        if cfg.resume and saved.is_file():
            before = _flatten(to_dict(from_dict(TrainConfig, yaml.safe_load(saved.read_text()) or {})))
            changed = {k: [before.get(k), v] for k, v in _flatten(current).items() if before.get(k) != v}
            if changed:
                log.info("resuming with changed settings: %s", changed)
                with open(self.out / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "changed": changed}) + "\n")
        write_atomically(saved, yaml.safe_dump(current, sort_keys=False))

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
        prompts = [self._prompt_ids(m) for m in messages]
        rollouts = self._generate(prompts)
        t_gen = time.perf_counter()

        texts = self.tokenizer.batch_decode(rollouts.responses, skip_special_tokens=True)
        evals = self.evaluator.evaluate([problems[i // G] for i in range(len(texts))], texts)
        rewards = [e.reward for e in evals]
        t_env = time.perf_counter()

        loss_metrics, loss_value = self._score_and_backward(messages, prompts, rollouts.responses, rewards,
                                                            [e.feedback for e in evals], rollouts.logprobs)
        t_score = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses (the scheduler then moves on)
        grad_norm = self._optimizer_step()
        t_update = time.perf_counter()
        self._sync_rollout_weights()
        t_end = time.perf_counter()

        lengths = [len(r) for r in rollouts.responses]
        tokens = sum(lengths) + sum(len(prompts[i // G]) for i in range(len(lengths)))
        local = {"loss": loss_value, **loss_metrics}
        metrics = self._mean_over_ranks(local)
        metrics.update(rollout_metrics(self._concat_over_ranks(rewards), self._concat_over_ranks(lengths),
                                       self._concat_over_ranks(list(rollouts.truncated)),
                                       self._concat_over_ranks(["error" in e.details for e in evals]), G,
                                       cfg.reprompt.success_reward_threshold))
        metrics.update({
            "grad_norm": float(grad_norm),
            "lr": lr,
            "samples": self.step * cfg.prompts_per_step * G,
            "time/elapsed_s": self.elapsed_before + time.perf_counter() - self.started,
            "throughput/tokens_per_s": self._sum_over_ranks(tokens) / (t_end - t0),
            "time/generate_s": t_gen - t0,
            "time/evaluate_s": t_env - t_gen,
            "time/score_s": t_score - t_env,
            "time/update_s": t_update - t_score,
            "time/step_s": t_end - t0,
            **({"time/weight_sync_s": t_end - t_update} if self.vllm is not None else {}),
            **self._gather_over_ranks(self.telemetry.end()),
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
        metrics, loss = self._score_and_backward(messages, prompts, responses, rewards, feedback)
        grad_norm = float(self._optimizer_step())
        self._sync_rollout_weights()
        return {**metrics, "loss": loss, "grad_norm": grad_norm}

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, schedule, zero the gradients, move the teacher; returns the pre-clip grad norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            self.teacher.after_step()
        return grad_norm

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

    def _sync_rollout_weights(self) -> None:
        """Push the policy's weights into the vLLM engine, one gathered parameter at a time (no-op with HF)."""
        if self.vllm is not None:
            self.vllm.load_weights(full_weights(self.policy.lm, dtype=getattr(torch, self.cfg.vllm.dtype)))

    def _score_and_backward(self, messages, prompts, responses, rewards, feedback,
                            rollout_logp: list[torch.Tensor] | None = None) -> tuple[dict, float]:
        """Teacher contexts, micro-batched scoring with the fused op, and backward; returns (metrics, loss).

        rollout_logp: the sampler's per-token log-probs of each response (vLLM), the loss's `old_logp`;
        None: the responses are on-policy (HF generate from this very policy).
        """
        cfg, G, lcfg = self.cfg, self.cfg.rollouts_per_prompt, self.loss_cfg
        n = len(responses)
        groups = [self.rt.rank * 1_000_000 + i // G for i in range(n)]
        width = max(len(r) for r in responses)
        targets = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, r in enumerate(responses):
            targets[i, : len(r)] = torch.tensor(r)
        response_mask = targets != IGNORE
        old_logp = None
        if rollout_logp is not None:
            old_logp = torch.zeros(n, width)
            for i, lp in enumerate(rollout_logp):
                if lp.shape != (len(responses[i]),):
                    raise ValueError(f"rollout log-probs of response {i} have shape {tuple(lp.shape)}, expected "
                                     f"({len(responses[i])},)")
                old_logp[i, : len(lp)] = lp

        ctx, extra = None, {}
        if self.teacher is not None:
            ctx = build_teacher_contexts(self.tokenizer, [messages[i // G] for i in range(n)], responses, rewards,
                                         groups, feedback, self.reprompt)
            extra = ctx.metrics()
            diagnostics = TeacherDiagnostics(self.tokenizer, responses, ctx)
        mask = lcfg.loss_mask(response_mask, ctx.mask if ctx is not None else None)
        group = dist.group.WORLD if self.rt.world_size > 1 else None
        agg = Aggregator.for_batch(mask, lcfg.agg_mode, norm_length=cfg.sampling.max_new_tokens, process_group=group)
        advantages = (grpo_advantages(rewards, groups, norm_by_std=cfg.loss.grpo_norm_by_std)
                      if lcfg.mode in ("grpo", "blend") else None)
        op_targets = torch.where(mask, targets, IGNORE).to(self.rt.device)
        distill = dict(temperature=cfg.sampling.temperature, **lcfg.distill_kwargs())
        teacher_head = self._teacher_head()
        teacher_index = {row: k for k, row in enumerate(ctx.rows)} if ctx is not None else {}

        metrics, total = Metrics(), 0.0
        for lo in range(0, n, cfg.micro_batch_size):
            rows = list(range(lo, min(n, lo + cfg.micro_batch_size)))
            seqs = [prompts[i // G] + responses[i] for i in rows]
            starts = [len(prompts[i // G]) for i in rows]
            teacher = self._teacher_batch(ctx, teacher_index, rows, teacher_head) if self.teacher else None
            out = self.policy(seqs, starts, op_targets[rows], teacher, distill)
            dev = self.rt.device
            common = dict(advantages=advantages[rows].to(dev) if advantages is not None else None,
                          old_logp=old_logp[rows].to(dev) if old_logp is not None else None,
                          ref_logp=self._reference_logp(seqs, starts, op_targets[rows], distill))
            if teacher is None:
                batch = TokenBatch(mask=mask[rows].to(dev), student_logp=out.logp, entropy=out.entropy, **common)
            else:
                batch = TokenBatch.from_distill(out, mask[rows].to(dev), sd_mask=ctx.mask[rows].to(dev), **common)
                diagnostics.add(rows, out, batch.mask)
            loss = compute_loss(lcfg, agg, batch, metrics)
            if batch.old_logp is not None:
                metrics.add("rollout/logp_abs_diff", (batch.student_logp - batch.old_logp).abs(), batch.mask)
            loss.backward()
            total += float(loss.detach())
        if self.teacher_policy is not None:
            _reshard(self.teacher_policy)
        if self.ref_policy is not None and self.ref_policy is not self.teacher_policy:
            _reshard(self.ref_policy)
        return {**extra, **metrics.summary(), **(diagnostics.metrics() if ctx is not None else {})}, total

    @torch.no_grad()
    def _reference_logp(self, seqs, starts, targets: torch.Tensor, distill: dict) -> torch.Tensor | None:
        """log p_ref(y_t) of the sampled tokens under the frozen initial model (at the sampling temperature, as
        the policy's), for the KL penalty; None without one."""
        if self.ref_policy is None:
            return None
        return self.ref_policy(seqs, starts, targets, None, {"temperature": distill["temperature"]}).logp

    def _teacher_head(self) -> torch.Tensor | None:
        """The teacher's LM head for this step (gathered once when sharded)."""
        if self.teacher is None:
            return None
        heads = [full_tensor(m.get_output_embeddings().weight) for m in self.teacher.scoring_models]
        return self.teacher.teacher_head(heads)

    @torch.no_grad()
    def _teacher_batch(self, ctx, teacher_index: dict, rows: list[int], head) -> TeacherBatch:
        local = [j for j, i in enumerate(rows) if i in teacher_index]
        seqs = [ctx.input_ids[teacher_index[rows[j]]] for j in local]
        starts = [ctx.response_start[teacher_index[rows[j]]] for j in local]
        external = []
        for model in self.teacher.scoring_models:
            if model is self.policy.lm:
                external.append(None)  # live: computed inside the policy's forward, continuing its prompt KV
            else:
                external.append(self.teacher_policy.hidden(seqs, starts) if seqs else [])
        return TeacherBatch(rows=local, sequences=seqs, starts=starts, external=external,
                            combine=self.teacher.teacher_hidden, weight=head)

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
        return self._sum_over_ranks(correct) / max(len(problems), 1)

    # ----------------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"model": get_model_state_dict(self.policy),
                 "optim": get_optimizer_state_dict(self.policy, self.optimizer),
                 "scheduler": self.scheduler.state_dict()}
        if self.teacher_policy is not None:
            state["teacher"] = get_model_state_dict(self.teacher_policy)
        return state

    def save(self) -> Path:
        extras = {"step": self.step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                  "numpy_rng": np.random.get_state(),
                  "elapsed_s": self.elapsed_before + time.perf_counter() - self.started}
        return checkpoint.save_checkpoint(self.ckpt_dir, self.step, self._state(), extras,
                                          keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        path = checkpoint.latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise ValueError(f"--resume: no checkpoint under {self.ckpt_dir}")
        state = self._state()
        extras = checkpoint.load_checkpoint(path, state)
        set_model_state_dict(self.policy, state["model"])
        set_optimizer_state_dict(self.policy, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher_policy is not None:
            set_model_state_dict(self.teacher_policy, state["teacher"])
        torch.set_rng_state(extras["torch_rng"])
        random.setstate(extras["python_rng"])
        np.random.set_state(extras["numpy_rng"])
        self.step = extras["step"]
        self.elapsed_before = extras.get("elapsed_s", 0.0)
        self.started = time.perf_counter()
        self._sync_rollout_weights()
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> Path:
        """The trained model as a Hugging Face directory (output_dir/model), written atomically."""
        final = self.out / "model"
        full = get_model_state_dict(self.policy.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rt.is_main:
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.policy.lm.save_pretrained(tmp, state_dict=full)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self._barrier()
        return final

    # ----------------------------------------------------------------------------------------------------
    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tokenizer, messages)

    def _barrier(self) -> None:
        if self.rt.world_size > 1:
            dist.barrier()

    def _sum_over_ranks(self, value: float) -> float:
        if self.rt.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t)
        return float(t)

    def _concat_over_ranks(self, values: list) -> list:
        """Every rank's `values`, concatenated in rank order (groups stay whole: each rank has its own)."""
        if self.rt.world_size == 1:
            return list(values)
        parts: list = [None] * self.rt.world_size
        dist.all_gather_object(parts, list(values))
        return [v for part in parts for v in part]

    def _gather_over_ranks(self, metrics: dict) -> dict:
        """The union of every rank's `metrics` (keys distinct per rank, e.g. GPU telemetry)."""
        if self.rt.world_size == 1:
            return metrics
        parts: list = [None] * self.rt.world_size
        dist.all_gather_object(parts, metrics)
        return {k: v for part in parts for k, v in part.items()}

    def _mean_over_ranks(self, metrics: dict) -> dict:
        if self.rt.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t)
        return {k: float(v) / self.rt.world_size for k, v in zip(keys, t.tolist())}


def _reshard(policy: Policy) -> None:
    """Return FSDP2 parameters to their shards after a forward without backward (generation, teacher
    scoring): the root group stays gathered after forward by design, which would leave full tensors
    behind for the EMA update and the checkpoint."""
    if isinstance(policy, FSDPModule):
        policy.reshard()


def rollout_metrics(rewards: list[float], lengths: list[int], truncated: list[bool], errors: list[bool], group: int,
                    success_threshold: float) -> dict:
    """The step's reward and response statistics over all rollouts (consecutive `group` rollouts share a prompt):
    reward mean/std/min/max, success fraction, fraction of groups whose rewards are all equal (no GRPO signal),
    response length mean/min/max, truncated fraction, and how many evaluations the environment failed."""
    r = np.asarray(rewards, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.float64)
    groups = r.reshape(-1, group)
    return {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()), "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "reward/success_frac": float(np.mean(r >= success_threshold)),
        "reward/zero_std_group_frac": float(np.mean(groups.max(1) == groups.min(1))),
        "response/length_mean": float(n.mean()), "response/length_min": float(n.min()),
        "response/length_max": float(n.max()),
        "response/truncated_frac": float(np.mean(truncated)),
        "env/errors": int(sum(errors)),
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"loss.alpha": 0.5, ...} from nested mappings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "task_options" and key != "chat_template_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

