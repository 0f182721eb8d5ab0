"""A step's rollouts laid out for the loss: row i is rollout i, its response padded into a [n, T] target
matrix, with the sampler's log-probs (when the rollout engine reports them) and the GRPO group ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from sdpo_fast.distill import IGNORE_INDEX
from sdpo_fast.rollout import Rollouts

# Group ids of rank r start at r * GROUPS_PER_RANK, so that groups stay distinct when gathered over ranks.
GROUPS_PER_RANK = 1_000_000


@dataclass
class StepBatch:
    """rollouts: what was sampled. targets: [n, T] response tokens, IGNORE_INDEX after each response's end.
    old_logp: [n, T] the sampler's log-probs of the response tokens (zero-padded), the loss's `old_logp`;
    None when the responses are on-policy. groups: each rollout's group id (one per prompt)."""

    rollouts: Rollouts
    targets: torch.Tensor
    old_logp: torch.Tensor | None
    groups: list[int]

    @property
    def response_mask(self) -> torch.Tensor:
        """[n, T] True on response tokens."""
        return self.targets != IGNORE_INDEX

    def sequences(self, rows: list[int]) -> list[list[int]]:
        """Prompt + response token ids of `rows`."""
        r = self.rollouts
        return [r.prompts[r.group(i)] + r.responses[i] for i in rows]

    def starts(self, rows: list[int]) -> list[int]:
        """Where each response of `rows` starts in its sequence."""
        return [len(self.rollouts.prompts[self.rollouts.group(i)]) for i in rows]

    def micro_batches(self, size: int) -> Iterator[list[int]]:
        """The row indices in consecutive chunks of at most `size`."""
        n = len(self.rollouts.responses)
        for lo in range(0, n, size):
            yield list(range(lo, min(n, lo + size)))


def collate(rollouts: Rollouts, rank: int = 0) -> StepBatch:
    """`rollouts` of process `rank` as a StepBatch; ValueError when the sampler's log-probs of a response do
    not have one entry per response token."""
    responses = rollouts.responses
    n, width = len(responses), max(len(r) for r in responses)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(responses):
        targets[i, : len(r)] = torch.tensor(r)
    old_logp = None
    if rollouts.logprobs is not None:
        old_logp = torch.zeros(n, width)
        for i, lp in enumerate(rollouts.logprobs):
            if lp.shape != (len(responses[i]),):
                raise ValueError(f"rollout log-probs of response {i} have shape {tuple(lp.shape)}, expected "
                                 f"({len(responses[i])},)")
            old_logp[i, : len(lp)] = lp
    groups = [rank * GROUPS_PER_RANK + rollouts.group(i) for i in range(n)]
    return StepBatch(rollouts, targets, old_logp, groups)
