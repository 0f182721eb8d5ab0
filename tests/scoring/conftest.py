"""Shared helpers of the shared-prefix scoring tests: random token batches and error measures."""

from __future__ import annotations

import torch

VOCAB = 257


def tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


def mixed_batch(gen: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """Sequences covering every grouping case the packer meets, with their response starts."""
    p1, p2, p3 = tokens(gen, 17), tokens(gen, 6), tokens(gen, 11)
    same, common = tokens(gen, 5), tokens(gen, 4)
    cases = [
        (p1, tokens(gen, 5)), (p1, tokens(gen, 9)), (p1, tokens(gen, 1)),  # G rollouts of one prompt
        (p1, common + tokens(gen, 3)), (p1, common + tokens(gen, 6)),  # responses sharing their first tokens
        (p1, same), (p1, same),  # identical sequences
        (p1, same[:2]),  # a whole sequence that is a prefix of another one
        (p1[:9], tokens(gen, 4)),  # a prompt that is a prefix of another prompt
        (p2, tokens(gen, 21)), (p2, tokens(gen, 19)),  # short prompt, long responses
        (p3, tokens(gen, 7)),  # a group of one
        (tokens(gen, 1), tokens(gen, 4)),  # a one-token prompt
    ]
    return [p + r for p, r in cases], [len(p) for p, _ in cases]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))


def max_rel_err(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    assert [x.shape for x in xs] == [y.shape for y in ys]
    return max(rel_err(x, y) for x, y in zip(xs, ys))
