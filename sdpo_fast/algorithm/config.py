"""Settings of the algorithm layer: the loss (`LossConfig`) and the teacher contexts (`RepromptConfig`).

Plain dataclasses without torch, so a command line can build and check them before importing the
heavy modules; the trainer's configuration embeds them as they are (field docstrings are their help).
Every value is checked when the dataclass is built, with a message naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import tyro

LossMode = Literal["sdpo", "sdpo_token", "grpo", "blend"]
KLType = Literal["k1", "k2", "k3"]
TeacherMode = Literal["ema", "live", "frozen", "trust_region"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_MODES: tuple[str, ...] = get_args(LossMode)
KL_TYPES: tuple[str, ...] = get_args(KLType)
AGG_MODES: tuple[str, ...] = get_args(AggMode)
TEACHER_MODES: tuple[str, ...] = get_args(TeacherMode)

# The reference's templates, verbatim ({prompt}: the last user message; {solution} and {feedback}: the
# two sections below, each empty when unused).
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"


@dataclass(frozen=True)
class LossConfig:
    """The training objective; defaults are the reference's SDPO settings."""

    mode: Annotated[LossMode, tyro.conf.arg(name="algorithm", prefix_name=False)] = "sdpo"
    """sdpo: distillation on full (or top-k) distributions; sdpo_token: the sampled-token form (needs
    alpha=1); grpo: clipped policy gradient on group-normalised rewards; blend: A = lambda A_GRPO +
    (1 - lambda) A_SDPO."""
    alpha: float = 0.5
    """Divergence: 0 KL(teacher||student), 1 KL(student||teacher), in between the generalized JSD."""
    topk: int | None = None
    """None: the full vocabulary; k: the student's top-k support (reference: 100)."""
    add_tail: bool = True
    """With topk: one extra bucket holds the probability mass outside the top-k."""
    is_clip: float | None = 2.0
    """Cap of the token importance weight min(p_trainer(y) / p_rollout(y), is_clip) that corrects the
    rollout engine's log-prob mismatch (sdpo modes with --rollout vllm); None: no correction."""
    eps_low: float = 0.2
    """Lower clip of the ratio (grpo, blend): 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip of the ratio (grpo, blend): 1 + eps_high."""
    dual_clip: float | None = None
    """Dual clip c > 1 bounding negative-advantage tokens at -A c (grpo, blend); None: off."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the frozen initial model (the reference policy); 0: none."""
    kl_type: KLType = "k3"
    """Per-token KL estimator: k1 = log p - log p_ref, k2 = (log p - log p_ref)^2 / 2, k3 = e^d - d - 1
    with d = log p_ref - log p (low variance)."""
    blend_lambda: float = 0.9
    """Weight of the GRPO advantage in blend."""
    adv_clip: float | None = None
    """Clamp of the advantages to [-adv_clip, adv_clip] (blend, sdpo_token; sdpo needs alpha=1 and topk)."""
    agg_mode: AggMode = "token-mean"
    """How per-token losses are averaged over the mini-batch."""
    grpo_norm_by_std: bool = True
    """Divide the GRPO advantage by its group's reward std (False: r - mean, as Dr.GRPO)."""

    def __post_init__(self) -> None:
        choice("mode (--algorithm)", self.mode, LOSS_MODES)
        choice("kl_type", self.kl_type, KL_TYPES)
        choice("agg_mode", self.agg_mode, AGG_MODES)
        number("alpha", self.alpha, 0.0, 1.0)
        number("blend_lambda", self.blend_lambda, 0.0, 1.0)
        number("eps_low", self.eps_low, 0.0, 1.0)
        number("eps_high", self.eps_high, 0.0, math.inf)
        number("kl_coef", self.kl_coef, 0.0, math.inf)
        for name in ("add_tail", "grpo_norm_by_std"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("is_clip", "adv_clip"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), 0.0, math.inf, open_low=True)
        if self.dual_clip is not None:
            number("dual_clip", self.dual_clip, 1.0, math.inf, open_low=True)
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"topk must be None or a positive int, got {self.topk!r}")
        if self.mode == "sdpo_token" and self.alpha != 1.0:
            raise ValueError(f"mode 'sdpo_token' is the reverse-KL (alpha=1) objective; got alpha={self.alpha}")
        if self.mode == "sdpo" and self.adv_clip is not None and (self.alpha != 1.0 or self.topk is None):
            raise ValueError(f"adv_clip in mode 'sdpo' clips the reverse KL's advantages on the student's top-k: "
                             f"it needs alpha=1 and topk set, got alpha={self.alpha}, topk={self.topk}")

    @property
    def uses_teacher(self) -> bool:
        """Whether the mode needs teacher scores (every mode but "grpo")."""
        return self.mode != "grpo"

    @property
    def uses_group_advantage(self) -> bool:
        """Whether the mode normalises rewards within a prompt's group (needs >= 2 rollouts per prompt)."""
        return self.mode in ("grpo", "blend")

    def distill_kwargs(self) -> dict:
        """Keyword arguments for `linear_distill` (add the sampling temperature)."""
        return {"alpha": self.alpha, "topk": self.topk, "add_tail": self.add_tail,
                "adv_clip": self.adv_clip if self.mode == "sdpo" else None}

    def loss_mask(self, response_mask, sd_mask=None):
        """The tokens the loss averages over ([B, T] bool tensor): response tokens, and for the pure SDPO
        modes only rows with a teacher (as the reference does). Build the `Aggregator` from this mask."""
        mask = response_mask.bool()
        if self.mode in ("sdpo", "sdpo_token") and sd_mask is not None:
            if sd_mask.shape != mask.shape[:1]:
                raise ValueError(f"sd_mask must be [B={mask.shape[0]}], got {tuple(sd_mask.shape)}")
            mask = mask & sd_mask.bool().unsqueeze(-1)
        return mask


@dataclass(frozen=True)
class RepromptConfig:
    """What the self-teacher sees: a demonstration from a successful sibling and the environment's feedback.
    Defaults are the reference's effective settings."""

    success_reward_threshold: float = 0.5
    """A rollout with reward >= this is a success (a demonstration for its siblings)."""
    self_demonstration: bool = False
    """A successful rollout may be its own demonstration (off: it gets another success of its group, if any)."""
    remove_thinking_from_demonstration: bool = True
    """Strip <think>...</think> blocks from demonstrations."""
    include_environment_feedback: bool = True
    """Show the environment's feedback on the rollout to the teacher."""
    environment_feedback_only_without_solution: bool = True
    """Show the feedback only when there is no demonstration."""
    max_reprompt_len: int = 10240
    """Token cap of a teacher prompt (truncated from the left)."""
    reprompt_template: str = REPROMPT_TEMPLATE
    """The teacher's user message, with the fields {prompt}, {solution} and {feedback}."""
    solution_template: str = SOLUTION_TEMPLATE
    """The demonstration section, with the field {successful_previous_attempt}."""
    feedback_template: str = FEEDBACK_TEMPLATE
    """The feedback section, with the field {feedback_raw}."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `tokenizer.apply_chat_template`, e.g. {"enable_thinking": False}."""

    def __post_init__(self) -> None:
        number("success_reward_threshold", self.success_reward_threshold, -math.inf, math.inf)
        if isinstance(self.max_reprompt_len, bool) or not isinstance(self.max_reprompt_len, int) \
                or self.max_reprompt_len < 1:
            raise ValueError(f"max_reprompt_len must be a positive int, got {self.max_reprompt_len!r}")
        for name in ("self_demonstration", "remove_thinking_from_demonstration", "include_environment_feedback",
                     "environment_feedback_only_without_solution"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, keys in (("reprompt_template", ("prompt", "solution", "feedback")),
                           ("solution_template", ("successful_previous_attempt",)),
                           ("feedback_template", ("feedback_raw",))):
            template = getattr(self, name)
            if not isinstance(template, str):
                raise ValueError(f"{name} must be a string, got {template!r}")
            try:
                template.format(**{k: "" for k in keys})
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{name} may only use the fields {keys}: {exc!r}") from exc
        if not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a mapping, got {self.chat_template_kwargs!r}")


def choice(name: str, value: Any, options: tuple) -> None:
    """Raise a ValueError naming `name` unless `value` is one of `options`."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def number(name: str, value: Any, low: float, high: float, open_low: bool = False) -> None:
    """Raise a ValueError naming `name` unless `value` is a number in [low, high] ((low, high] if open_low)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bound}{low}, {high}], got {value!r}")
