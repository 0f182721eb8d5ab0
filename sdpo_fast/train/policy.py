"""The policy as the trainer runs it: a causal LM whose forward scores responses and applies the fused op.

Under FSDP2 the root group (embeddings, final norm, tied LM head) is gathered for the root module's
forward and for methods registered with `register_fsdp_forward_method`. Wrapping the LM in `Policy` and
doing everything that touches those weights — generation, hidden states, `linear_distill` — inside
`Policy` methods keeps the LM head gathered exactly while the fused op runs.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from sdpo_fast.algorithm.teachers import lm_head_weight
from sdpo_fast.distill import DistillOutput, LogProbOutput, linear_distill, linear_logprobs
from sdpo_fast.scoring import PrefixKV, enable_prefix_attention, response_hidden_states


@dataclass
class TeacherBatch:
    """Teacher inputs of one micro-batch.

    rows: micro-batch rows that have a teacher sequence. sequences / starts: those sequences and their
    response starts. external: per scoring model that is NOT this policy, its hidden states on `sequences`
    (None marks where this policy's own, live, stop-grad hidden states go). combine: turns the
    per-model padded hidden states [rows, T, H] into the teacher hidden [rows, T, H_t]. weight: the teacher
    head ([V, H_t]; None = this policy's head, stop-grad).
    """

    rows: list[int]
    sequences: list[list[int]]
    starts: list[int]
    external: list[list[torch.Tensor] | None]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    weight: torch.Tensor | None


@contextlib.contextmanager
def quiet_cache_warning():
    """transformers 5.x warns on every forward that receives `past_key_values` (its `generate` and our prefix-KV
    scoring both pass it) that the argument is deprecated: not actionable for users, so silenced around our calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        yield


def pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack [L_i, H] tensors into [B, length, H], zero-padded at the end."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class Policy(nn.Module):
    """Wraps a Hugging Face causal LM (`self.lm`); see the module docstring."""

    def __init__(self, lm: PreTrainedModel, share_prefix: bool = True, reuse_prefix_kv: bool = True):
        super().__init__()
        if share_prefix:  # packed rows attend segment by segment instead of through a dense mask
            enable_prefix_attention(lm)
        self.lm = lm
        self.share_prefix = share_prefix
        self.reuse_prefix_kv = reuse_prefix_kv and share_prefix


    def hidden(self, sequences, starts, prefix_kv: PrefixKV | None = None,
               record: PrefixKV | None = None) -> list[torch.Tensor]:
        """Response hidden states of `sequences` (see `sdpo_fast.response_hidden_states`)."""
        with quiet_cache_warning():
            return response_hidden_states(self.lm, sequences, starts, share_prefix=self.share_prefix,
                                          prefix_kv=prefix_kv, record_prefix_kv=record)

    def generate(self, **kwargs) -> torch.Tensor:
        return self.lm.generate(**kwargs)

    def forward(self, sequences: list[list[int]], starts: list[int], targets: torch.Tensor,
                teacher: TeacherBatch | None, distill_kwargs: dict) -> DistillOutput | LogProbOutput:
        """Score one micro-batch: student hidden states (with grad), then the fused op.

        targets: [B, T] response tokens, IGNORE_INDEX (-100) where there is nothing to score. With a teacher:
        `linear_distill` against the teacher hidden states; without one (GRPO): `linear_logprobs`.
        """
        length = targets.shape[1]
        if teacher is None:
            h_s = pad_rows(self.hidden(sequences, starts), length)
            return linear_logprobs(h_s, lm_head_weight(self.lm), targets, temperature=distill_kwargs["temperature"])
        record = PrefixKV() if self.reuse_prefix_kv and None in teacher.external else None
        h_s = pad_rows(self.hidden(sequences, starts, record=record), length)
        h_t = self._teacher_hidden(teacher, h_s, record)
        return linear_distill(h_s, h_t, lm_head_weight(self.lm), targets, teacher_weight=teacher.weight,
                              **distill_kwargs)

    @torch.no_grad()
    def _teacher_hidden(self, teacher: TeacherBatch, h_s: torch.Tensor, record: PrefixKV | None) -> torch.Tensor:
        """[B, T, H_t] teacher hidden states; zeros on rows without a teacher sequence."""
        width = h_s.shape[-1] if teacher.weight is None else teacher.weight.shape[1]
        h_t = h_s.new_zeros(*h_s.shape[:-1], width)
        if not teacher.rows:
            return h_t
        parts = []
        for ext in teacher.external:
            rows = ext if ext is not None else self.hidden(teacher.sequences, teacher.starts, prefix_kv=record)
            parts.append(pad_rows(rows, h_s.shape[1]))
        h_t[teacher.rows] = teacher.combine(parts)
        return h_t
