"""Teacher contexts ("reprompting"): what the self-teacher sees before it re-scores a rollout.

Per rollout: pick a demonstration (another successful rollout of the same group), take the rollout's
environment feedback, and write both into ONE user message after the original question. The message is
chat-templated with the generation prompt, truncated from the left to `max_reprompt_len` tokens (the
assistant header at the end survives), and the rollout's own response token ids are appended. A
rollout with neither a demonstration nor usable feedback has nothing to learn from: its
self-distillation mask is 0 and it gets no teacher sequence at all, so nobody scores it.

Everything here is plain data in, plain data out (messages, texts, token ids, rewards, group ids), so
any trainer can call it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch

from sdpo_fast.algorithm.config import (  # noqa: F401  (re-exported)
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    RepromptConfig,
)
from sdpo_fast.algorithm.groups import group_index

logger = logging.getLogger(__name__)

_THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)

Message = dict[str, Any]


@dataclass
class TeacherContexts:
    """Teacher inputs of one batch of R rollouts.

    Per rollout (length R):
        mask: float32 [R] self-distillation mask; 1 where the rollout has a teacher sequence.
        demonstration: index of the rollout used as demonstration, or None.
        feedback_used: whether the rollout's feedback went into its teacher prompt.
        feedback_available: whether the rollout had non-empty feedback.
        success: whether the rollout's reward reached the success threshold.
        groups: dense index of the rollout's prompt group.
    Per teacher sequence (only the rows with mask 1, in rollout order):
        rows: the rollout index of each teacher sequence.
        input_ids: teacher prompt token ids followed by the rollout's response token ids.
        response_start: index in `input_ids` of the first response token (= teacher prompt length).
        truncated: whether the teacher prompt was cut from the left to `max_reprompt_len`.
        prompt_texts: the chat-templated teacher prompt before tokenisation and truncation.
    """

    mask: torch.Tensor
    demonstration: list[int | None]
    feedback_used: list[bool]
    feedback_available: list[bool]
    success: list[bool]
    groups: list[int]
    rows: list[int]
    input_ids: list[list[int]]
    response_start: list[int]
    truncated: list[bool]
    prompt_texts: list[str]

    def metrics(self) -> dict[str, float]:
        """Fractions a practitioner watches: how much of the batch has something to learn from."""
        n = max(len(self.demonstration), 1)
        groups: dict[int, bool] = {}
        for gid, ok in zip(self.groups, self.success):
            groups[gid] = groups.get(gid, False) or ok
        return {
            "reprompt/success_group_fraction": sum(groups.values()) / max(len(groups), 1),
            "reprompt/success_fraction": sum(self.success) / n,
            "reprompt/demonstration_fraction": sum(d is not None for d in self.demonstration) / n,
            "reprompt/feedback_available_fraction": sum(self.feedback_available) / n,
            "reprompt/feedback_used_fraction": sum(self.feedback_used) / n,
            "reprompt/reprompt_fraction": len(self.rows) / n,
            "reprompt/truncated_fraction": sum(self.truncated) / n,
            "reprompt/mean_teacher_prompt_len": (sum(self.response_start) / len(self.rows)) if self.rows else 0.0,
            "reprompt/teacher_tokens": float(sum(len(ids) for ids in self.input_ids)),
        }


def strip_thinking(text: str) -> str:
    """Remove every `<think>...</think>` block (and the whitespace after it) from a demonstration."""
    return _THINKING.sub("", text)


def select_demonstrations(
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    success_reward_threshold: float = 0.5,
    self_demonstration: bool = False,
) -> list[int | None]:
    """Index of each rollout's demonstration: the first successful rollout of its group, or None.

    A rollout is successful when its reward >= `success_reward_threshold`. Without `self_demonstration`
    (the default) a rollout is never its own demonstration: it gets the first successful rollout of its
    group other than itself (so a lone success gets none). With it, every rollout of a group with a
    success gets the first one, which may be the rollout itself.
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"rewards ({len(rewards)}) and group_ids ({len(group_ids)}) must have one entry per rollout")
    groups = group_index(group_ids)
    successes: dict[int, list[int]] = {}
    for i, (gid, reward) in enumerate(zip(groups, rewards)):
        if float(reward) >= success_reward_threshold:
            successes.setdefault(gid, []).append(i)
    demos: list[int | None] = []
    for i, gid in enumerate(groups):
        candidates = [j for j in successes.get(gid, []) if self_demonstration or j != i]
        demos.append(candidates[0] if candidates else None)
    return demos


def teacher_message(
    messages: Sequence[Message],
    demonstration: str | None,
    feedback: str | None,
    config: RepromptConfig,
) -> list[Message] | None:
    """The teacher's conversation for one rollout, or None when there is nothing to learn from.

    `feedback` is used only if non-empty (after stripping whitespace), allowed by
    `include_environment_feedback`, and, with `environment_feedback_only_without_solution`, only when
    there is no demonstration. Messages before the last one are kept as they are (system prompts);
    the last one must be the user's question and is replaced by the reprompt.
    """
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise ValueError("messages must be a non-empty chat whose last message has role 'user' and text "
                         f"content, got roles {[m.get('role') for m in messages]}")
    use_feedback = _feedback_used(feedback, demonstration is not None, config)
    if demonstration is None and not use_feedback:
        return None
    solution = config.solution_template.format(successful_previous_attempt=demonstration) \
        if demonstration is not None else ""
    feedback_section = config.feedback_template.format(feedback_raw=feedback) if use_feedback else ""
    content = config.reprompt_template.format(prompt=messages[-1]["content"], solution=solution,
                                              feedback=feedback_section)
    return [dict(m) for m in messages[:-1]] + [{"role": "user", "content": content}]


def _feedback_used(feedback: str | None, has_demonstration: bool, config: RepromptConfig) -> bool:
    if not (config.include_environment_feedback and _has_text(feedback)):
        return False
    return not (config.environment_feedback_only_without_solution and has_demonstration)


def _has_text(feedback: str | None) -> bool:
    return isinstance(feedback, str) and bool(feedback.strip())


def assistant_header_ids(tokenizer, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids the chat template appends for the generation prompt (e.g. `<|im_start|>assistant\\n`)."""
    probe = [{"role": "user", "content": "x"}]
    kwargs = chat_template_kwargs or {}
    with_header = _encode(tokenizer, tokenizer.apply_chat_template(
        probe, tokenize=False, add_generation_prompt=True, **kwargs))
    without = _encode(tokenizer, tokenizer.apply_chat_template(
        probe, tokenize=False, add_generation_prompt=False, **kwargs))
    common = 0
    while common < min(len(with_header), len(without)) and with_header[common] == without[common]:
        common += 1
    return with_header[common:]


def _token_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_teacher_contexts(
    tokenizer,
    messages: Sequence[Sequence[Message]],
    response_ids: Sequence[Sequence[int]],
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    feedback: Sequence[str | None] | None = None,
    config: RepromptConfig | None = None,
    response_texts: Sequence[str] | None = None,
) -> TeacherContexts:
    """Teacher sequences for a batch of R rollouts (see `TeacherContexts`).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: per rollout, the student's prompt as chat messages (rollouts of one prompt repeat it).
        response_ids: per rollout, the sampled response token ids (no padding); appended unchanged.
        rewards: per rollout, the scalar reward (success: reward >= `success_reward_threshold`).
        group_ids: per rollout, the id of its prompt group; demonstrations never cross groups.
        feedback: per rollout, the environment's feedback text (None or "" for none).
        config: the builder's switches.
        response_texts: per rollout, the response text used as demonstration; by default the
            response ids decoded with special tokens skipped (the reference's choice).
    """
    config = config or RepromptConfig()
    n = len(messages)
    for name, seq in (("response_ids", response_ids), ("rewards", rewards), ("group_ids", group_ids),
                      ("feedback", feedback), ("response_texts", response_texts)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected one per rollout ({n})")
    feedback = list(feedback) if feedback is not None else [None] * n
    header = assistant_header_ids(tokenizer, config.chat_template_kwargs)
    if config.max_reprompt_len < len(header) + 1:
        raise ValueError(f"max_reprompt_len={config.max_reprompt_len} cannot hold the assistant header "
                         f"({len(header)} tokens) and one prompt token")

    demos = select_demonstrations(rewards, group_ids, config.success_reward_threshold,
                                  config.self_demonstration)
    needed = {d for d in demos if d is not None}
    if response_texts is None:
        texts = {d: tokenizer.decode(_token_list(response_ids[d]), skip_special_tokens=True) for d in needed}
    else:
        texts = {d: response_texts[d] for d in needed}
    if config.remove_thinking_from_demonstration:
        texts = {d: strip_thinking(t) for d, t in texts.items()}

    rows: list[int] = []
    prompt_texts: list[str] = []
    feedback_used: list[bool] = []
    for i in range(n):
        demo_text = texts[demos[i]] if demos[i] is not None else None
        chat = teacher_message(messages[i], demo_text, feedback[i], config)
        feedback_used.append(_feedback_used(feedback[i], demo_text is not None, config))
        if chat is not None:
            rows.append(i)
            prompt_texts.append(tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True, **config.chat_template_kwargs))

    # Rollouts of a group often share one teacher prompt (same demonstration, no feedback): encode once.
    unique = list(dict.fromkeys(prompt_texts))
    encoded = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}
    input_ids, response_start, truncated_rows = [], [], []
    for i, text in zip(rows, prompt_texts):
        prompt = encoded[text]
        cut = len(prompt) > config.max_reprompt_len
        prompt = list(prompt[-config.max_reprompt_len:]) if cut else list(prompt)
        input_ids.append(prompt + _token_list(response_ids[i]))
        response_start.append(len(prompt))
        truncated_rows.append(cut)
    if any(truncated_rows):
        logger.warning("%d of %d teacher prompts were longer than max_reprompt_len=%d and lost their beginning",
                       sum(truncated_rows), len(rows), config.max_reprompt_len)

    mask = torch.zeros(n, dtype=torch.float32)
    mask[rows] = 1.0
    return TeacherContexts(
        mask=mask,
        demonstration=demos,
        feedback_used=feedback_used,
        feedback_available=[_has_text(f) for f in feedback],
        success=[float(r) >= config.success_reward_threshold for r in rewards],
        groups=group_index(group_ids),
        rows=rows,
        input_ids=input_ids,
        response_start=response_start,
        truncated=truncated_rows,
        prompt_texts=prompt_texts,
    )
