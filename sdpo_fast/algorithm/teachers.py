"""Teacher modes: which weights score the teacher contexts, and how they move after each optimizer step.

- "live":         the current policy, stop-grad (unregularised; diverges in the paper's ablation).
- "ema":          own weights, teacher <- (1 - tau) teacher + tau student after each optimizer step.
- "frozen":       the initial policy.
- "trust_region": teacher logits = lerp(initial logits, current logits, tau). Computed without logits:
                  the fused op takes a teacher head of its own width, so
                  teacher_hidden = [(1 - tau) h_ref, tau h_cur] and teacher_weight = [W_ref, W_cur]
                  give b = (1 - tau) h_ref W_ref^T + tau h_cur W_cur^T exactly.

A trainer asks `scoring_models` which models to run on the teacher sequences (hidden states, no grad),
passes their LM-head weights to `teacher_head` once per optimizer step and their hidden states to
`teacher_hidden` per micro-batch, hands both to `linear_distill`, and calls `after_step()` after each
optimizer step.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from sdpo_fast.algorithm.config import TEACHER_MODES


class Teacher:
    """The self-teacher of one training run (see the module docstring).

    Args:
        mode: one of TEACHER_MODES.
        student: the policy being trained.
        tau: EMA rate ("ema") or mixing coefficient ("trust_region"); unused otherwise.
        model: the teacher's own weights for "ema", "frozen" and "trust_region" (the initial policy for
            the last two). None makes a deep copy of `student` now, so construct the Teacher before the
            first optimizer step. Pass your own when the student is sharded (build and shard it exactly
            like the student, e.g. FSDP2 `fully_shard` with the same mesh, so the EMA update runs shard
            by shard).
    """

    def __init__(self, mode: str, student: nn.Module, *, tau: float = 0.05, model: nn.Module | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"mode must be one of {TEACHER_MODES}, got {mode!r}")
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
        if mode == "live" and model is not None:
            raise ValueError("mode 'live' scores with the student itself; do not pass a teacher model")
        self.mode = mode
        self.tau = float(tau)
        self.student = student
        self.model: nn.Module | None = None
        if mode != "live":
            self.model = model if model is not None else copy.deepcopy(student)
            if self.model is student:
                raise ValueError(f"mode {mode!r} needs its own weights; `model` must not be the student")
            self.model.requires_grad_(False)

    @property
    def scoring_models(self) -> tuple[nn.Module, ...]:
        """Models whose hidden states (no grad) on the teacher sequences the trainer computes, in order."""
        if self.mode == "live":
            return (self.student,)
        if self.mode == "trust_region":
            return (self.model, self.student)
        return (self.model,)

    def teacher_head(self, heads: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """`teacher_weight` for `linear_distill` from the LM-head weights [V, H] of `scoring_models`.

        None for "live" (the fused op then uses the student head, stop-grad). For "trust_region" it is
        a new [V, 2H] tensor: build it once per optimizer step, not per micro-batch.
        """
        self._check_count("heads", heads)
        if self.mode == "live":
            return None
        if self.mode == "trust_region":
            return torch.cat([heads[0].detach(), heads[1].detach()], dim=-1)
        return heads[0].detach()

    def teacher_hidden(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """`teacher_hidden` for `linear_distill` from the hidden states [..., H] of `scoring_models`."""
        self._check_count("hidden", hidden)
        if self.mode == "trust_region":
            ref, cur = hidden[0].detach(), hidden[1].detach()
            if ref.shape != cur.shape:
                raise ValueError(f"trust_region hidden states must have one shape, got {tuple(ref.shape)} "
                                 f"and {tuple(cur.shape)}")
            return torch.cat([ref * (1.0 - self.tau), cur * self.tau], dim=-1)
        return hidden[0].detach()

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after every optimizer step: the EMA update for "ema", nothing for the other modes."""
        if self.mode == "ema":
            ema_update(self.model, self.student, self.tau)

    def _check_count(self, name: str, values: Sequence[torch.Tensor]) -> None:
        if len(values) != len(self.scoring_models):
            raise ValueError(f"{name}: mode {self.mode!r} needs {len(self.scoring_models)} tensors (one per "
                             f"scoring model), got {len(values)}")


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The [V, H] output-embedding weight of a Hugging Face causal LM (tied or not); ValueError when the model
    has no output embeddings or its head has a bias (the fused ops compute hidden @ weight^T, no bias)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"the LM head of {type(model).__name__} has a bias, which the fused ops do not add")
    return head.weight


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """teacher <- (1 - tau) teacher + tau student, parameter by parameter, in place.

    Works on FSDP2-sharded parameters (DTensor) without gathering them: when teacher and student are
    sharded alike, every rank lerps its local shards in one fused foreach call.
    """
    t_named = list(teacher.named_parameters())
    s_named = list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        raise ValueError("teacher and student must have the same parameter names in the same order")
    t_local, s_local = [], []
    for (name, t), (_, s) in zip(t_named, s_named):
        t_part, s_part = _local_pair(name, t, s)
        t_local.append(t_part)
        s_local.append(s_part.to(device=t_part.device, dtype=t_part.dtype))
    if t_local:
        torch._foreach_lerp_(t_local, s_local, float(tau))


def _local_pair(name: str, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The local storage of a teacher/student parameter pair, checked to line up element by element."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) != isinstance(s, DTensor):
        raise ValueError(f"parameter {name}: teacher and student must both be sharded (DTensor) or neither")
    if isinstance(t, DTensor):
        if t.device_mesh != s.device_mesh or t.placements != s.placements:
            raise ValueError(f"parameter {name}: teacher and student shards differ "
                             f"({t.placements} on {t.device_mesh} vs {s.placements} on {s.device_mesh})")
        t, s = t.to_local(), s.to_local()
    if t.shape != s.shape:
        raise ValueError(f"parameter {name}: teacher shape {tuple(t.shape)} does not match student {tuple(s.shape)}")
    return t, s
