"""A drop-in for TRL's SDPO trainer whose losses come from hidden states, never from [B, T, V] logits.

`FusedSDPOTrainer` subclasses `trl.experimental.sdpo.SDPOTrainer` and replaces only where the losses are
computed: `compute_loss` (student and teacher logits -> `linear_distill` on hidden states) and
`_compute_rollout_logps` (old log-probs -> `linear_logprobs`). Rollouts, rewards, teacher reprompting,
teacher synchronisation (EMA callback, PEFT adapters), logging and the optimizer loop are TRL's own.

Honoured `SDPOConfig` fields: `distillation_mode` ("full_logits", "topk_logits" with `distillation_topk`
and `distillation_add_tail`, "sampled_token"), `distillation_alpha`, `temperature` (both logit streams),
`distillation_is_clip` (with `old_per_token_logps`), `distillation_weight` (blend with the policy loss:
`loss_type`, `epsilon`, `epsilon_high`, `importance_sampling_level`), `teacher_model_kind`. With
`use_teacher_server=True` the teacher's log-probs come from vLLM and TRL's own path runs unchanged.
`beta` is not used by TRL's SDPO loss either.

TRL's experimental API moves between releases: this module follows trl 1.14.2 - 1.16 (the methods it
replaces are identical there) and is tested against 1.16.0.
"""

from __future__ import annotations

import torch

try:
    from trl.experimental.sdpo import SDPOTrainer
    from trl.experimental.sdpo.loss_utils import apply_importance_sampling_clipping
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError("sdpo_fast.integrations.trl needs TRL's SDPO trainer: pip install 'sdpo-fast[trl]'") from exc

from sdpo_fast.distill import IGNORE_INDEX, DistillOutput, linear_distill
from sdpo_fast.integrations.hf import call_with_head, completion_hidden, gathered, head_weight, token_logprobs, unwrap


class FusedSDPOTrainer(SDPOTrainer):
    """`SDPOTrainer` with the self-distillation and policy losses computed by the fused ops.

    Same constructor as `SDPOTrainer`, plus `fused_impl` (the `impl` of `linear_distill` /
    `linear_logprobs`: "auto", "chunked", "triton" or "naive"). Loss values, gradients and logged metrics
    equal TRL's to float precision; peak memory drops by the logits TRL materialises (student and
    teacher [B, T, V] in float32, plus their log-softmax copies).
    """

    def __init__(self, *args, fused_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_impl = fused_impl
        # Under bf16 / fp16 mixed precision TRL's LM head runs in autocast's dtype; so does the fused op
        # (fp32 statistics either way). None: the weight's dtype.
        self.head_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPOTrainer does not support returning outputs")
        if self.use_teacher_server:  # teacher log-probs come from vLLM: TRL's own path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        weight = self.args.distillation_weight
        if weight == 0.0:
            logps = token_logprobs(model, *self._student_inputs(inputs), inputs["completion_ids"],
                                   inputs["completion_mask"], temperature=self.temperature, dtype=self.head_dtype,
                                   impl=self.fused_impl).logp
            loss = self._policy_loss(inputs, logps)
        else:
            out, student_hidden, loss_mask = self._fused_distillation(model, inputs, policy_rows=weight < 1.0)
            loss = self._distillation_loss(model, inputs, out, student_hidden, loss_mask)
            if weight < 1.0:
                loss = (1 - weight) * self._policy_loss(inputs, out.student_logp) + weight * loss

        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    def _compute_rollout_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """TRL's old per-token log-probs (same condition), from hidden states; 0 on padded positions."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.args.gradient_accumulation_steps % generate_every == 0:
            return None
        with torch.no_grad():
            return token_logprobs(self.model, torch.cat([prompt_ids, completion_ids], dim=1),
                                  torch.cat([prompt_mask, completion_mask], dim=1), completion_ids, completion_mask,
                                  temperature=self.temperature, dtype=self.head_dtype, impl=self.fused_impl).logp

    @staticmethod
    def _student_inputs(inputs) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1))

    def _fused_distillation(self, model, inputs, *, policy_rows: bool) -> tuple[DistillOutput, torch.Tensor,
                                                                                torch.Tensor]:
        """(`linear_distill` outputs [B, T], student hidden states, TRL's loss mask) of a batch.

        Rows outside the loss mask are skipped (`ignore_index`) unless the policy loss needs their
        log-probs (`policy_rows`); TRL computes every row and multiplies by the mask afterwards.
        """
        mode = self.args.distillation_mode
        if mode not in ("full_logits", "topk_logits", "sampled_token"):
            raise ValueError("distillation_mode must be one of: 'sampled_token', 'full_logits', 'topk_logits', "
                             f"got {mode!r}")
        if mode == "topk_logits" and self.args.distillation_topk is None:
            raise ValueError("`distillation_mode='topk_logits'` requires `distillation_topk` to be set.")
        if mode == "sampled_token" and self.args.distillation_alpha != 1.0:
            raise ValueError("Only reverse KL (alpha=1.0) is supported for token-level distillation when "
                             f"`distillation_mode='sampled_token'`, got alpha={self.args.distillation_alpha}")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        sd_mask = inputs.get("self_distillation_mask")
        loss_mask = completion_mask if sd_mask is None else completion_mask * sd_mask.unsqueeze(1)
        num_tokens = completion_ids.size(1)

        student_hidden = completion_hidden(model, *self._student_inputs(inputs), num_tokens)
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden = completion_hidden(self.teacher_model, inputs["teacher_input_ids"],
                                               inputs["teacher_attention_mask"], num_tokens)
        # A teacher that is the student itself (live, or PEFT adapters switched above) shares its head.
        separate = unwrap(self.teacher_model) is not unwrap(model)
        teacher_weight = gathered(head_weight(self.teacher_model)) if separate else None

        rows = completion_mask if policy_rows else loss_mask
        targets = completion_ids.masked_fill(rows == 0, IGNORE_INDEX)

        def run(weight: torch.Tensor, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> DistillOutput:
            weight = weight.to(self.head_dtype or weight.dtype)
            head_t = None if teacher_weight is None else teacher_weight.to(self.head_dtype or teacher_weight.dtype)
            return linear_distill(
                student_hidden.to(weight.dtype), teacher_hidden.to((weight if head_t is None else head_t).dtype),
                weight, targets, teacher_weight=head_t, alpha=self.args.distillation_alpha,
                temperature=self.temperature,
                topk=self.args.distillation_topk if mode == "topk_logits" else None,
                add_tail=self.args.distillation_add_tail, impl=self.fused_impl,
            )

        return call_with_head(model, run, student_hidden, teacher_hidden), student_hidden, loss_mask

    def _distillation_loss(self, model, inputs, out: DistillOutput, student_hidden: torch.Tensor,
                           loss_mask: torch.Tensor) -> torch.Tensor:
        """TRL's `_compute_self_distillation_loss` on the fused op's per-token outputs (same metrics)."""
        mode_name = "train" if model.training else "eval"
        if loss_mask.sum() == 0:
            self._log_self_distillation_metric(mode_name, 0.0)
            # Attached to the student graph, so backward gives zero gradients instead of stopping.
            return student_hidden.sum() * 0.0

        if self.args.distillation_mode == "sampled_token":
            # TRL: (log p_S - log p_T).detach() * log p_S; advantage = log p_T - log p_S, detached.
            per_token_loss = -out.advantage * out.student_logp
        else:
            per_token_loss = out.divergence
        old_per_token_logps = inputs.get("old_per_token_logps")
        if self.args.distillation_is_clip is not None and old_per_token_logps is not None:
            per_token_loss = apply_importance_sampling_clipping(
                per_token_loss, out.student_logp, old_per_token_logps, self.args.distillation_is_clip)

        loss = ((per_token_loss * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
        mean_distill_loss = (per_token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        self._log_self_distillation_metric(mode_name, self.accelerator.gather(mean_distill_loss).mean().item())
        return loss

    def _policy_loss(self, inputs, per_token_logps: torch.Tensor) -> torch.Tensor:
        """TRL's `_compute_policy_loss` (clipped GRPO objective, `loss_type` aggregation, same metric) on
        per-token log-probs from the fused ops instead of logits."""
        completion_mask = inputs["completion_mask"]
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = per_token_logps - old_per_token_logps
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(
                -1, keepdim=True).clamp(min=1.0)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)

        if self.loss_type == "grpo":
            loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type in ("bnpo", "dapo"):
            loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
        else:
            raise ValueError(f"Unsupported loss_type: {self.loss_type}")

        mode_name = "train" if self.model.training else "eval"
        self._metrics[mode_name]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item())
        return loss
