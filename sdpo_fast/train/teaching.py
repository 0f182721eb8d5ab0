"""The self-teacher's side of one step: each rollout's teacher context (its reprompted sequence), the teacher
LM head (gathered once per step when sharded), per micro-batch the `TeacherBatch` the policy's forward takes,
and the step's teacher diagnostics."""

from __future__ import annotations

from typing import Sequence

import torch

from sdpo_fast.algorithm import Teacher, build_teacher_contexts
from sdpo_fast.algorithm.config import RepromptConfig
from sdpo_fast.algorithm.diagnostics import TeacherDiagnostics
from sdpo_fast.algorithm.teachers import lm_head_weight
from sdpo_fast.integrations.hf import gathered
from sdpo_fast.train.batch import StepBatch
from sdpo_fast.train.policy import Policy, TeacherBatch


class TeacherInputs:
    """What the teacher contributes to one step's loss (see the module docstring).

    teacher_policy: the Policy around the teacher's own weights (None for the live teacher, which is the
    policy itself: its hidden states are computed inside the policy's forward, continuing its prompt KV).
    """

    def __init__(self, teacher: Teacher, policy: Policy, teacher_policy: Policy | None, tokenizer,
                 reprompt: RepromptConfig, messages: Sequence[list[dict]], batch: StepBatch,
                 rewards: Sequence[float], feedback: Sequence[str]):
        rollouts = batch.rollouts
        self.teacher, self.policy, self.teacher_policy = teacher, policy, teacher_policy
        self.contexts = build_teacher_contexts(
            tokenizer, [messages[rollouts.group(i)] for i in range(len(rollouts.responses))], rollouts.responses,
            rewards, batch.groups, feedback, reprompt)
        self.diagnostics = TeacherDiagnostics(tokenizer, rollouts.responses, self.contexts)
        self.head = teacher.teacher_head([gathered(lm_head_weight(m)) for m in teacher.scoring_models])
        self._index = {row: k for k, row in enumerate(self.contexts.rows)}

    @torch.no_grad()
    def batch(self, rows: list[int]) -> TeacherBatch:
        """The teacher inputs of the micro-batch `rows`."""
        local = [j for j, i in enumerate(rows) if i in self._index]
        seqs = [self.contexts.input_ids[self._index[rows[j]]] for j in local]
        starts = [self.contexts.response_start[self._index[rows[j]]] for j in local]
        external = []
        for model in self.teacher.scoring_models:
            if model is self.policy.lm:
                external.append(None)  # live: computed inside the policy's forward, continuing its prompt KV
            else:
                external.append(self.teacher_policy.hidden(seqs, starts) if seqs else [])
        return TeacherBatch(rows=local, sequences=seqs, starts=starts, external=external,
                            combine=self.teacher.teacher_hidden, weight=self.head)
