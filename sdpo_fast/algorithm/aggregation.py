"""Loss aggregation over a mini-batch that is processed in micro-batches.

Every mode is a sum over tokens or sequences divided by a normaliser of the WHOLE mini-batch, so the
normaliser is counted once, before micro-batching (`Aggregator.for_batch`), and each micro-batch adds
its share (`Aggregator.__call__`). Summing (or backpropagating) the shares of all micro-batches gives
exactly the full-batch value, whatever the split. Modes (B sequences, mask m):

- "token-mean":              sum_{b,t} m l / (tokens in the mini-batch)
- "seq-mean-token-mean":     sum_b [sum_t m l / tokens of b] / (sequences with >= 1 token)
- "seq-mean-token-sum":      sum_{b,t} m l / (sequences with >= 1 token)
- "seq-mean-token-sum-norm": sum_{b,t} m l / (sequences with >= 1 token) / norm_length  (Dr.GRPO:
                             a constant length, by default the mini-batch's padded response length)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sdpo_fast.algorithm.config import AGG_MODES  # noqa: F401  (one list of modes, torch-free)


@dataclass(frozen=True)
class Aggregator:
    """Global normalisers of one mini-batch; call it on each micro-batch's per-token values [B, T].

    scale: multiplies every share; `for_batch` sets it to the data-parallel world size, because
    data-parallel training averages gradients over ranks while the normalisers already count all ranks.
    """

    mode: str
    num_tokens: float
    num_seqs: float
    norm_length: float
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in AGG_MODES:
            raise ValueError(f"mode must be one of {AGG_MODES}, got {self.mode!r}")
        if not self.norm_length > 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length!r}")

    @classmethod
    def for_batch(
        cls,
        mask: torch.Tensor,
        mode: str = "token-mean",
        *,
        norm_length: int | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> "Aggregator":
        """Count the normalisers of a whole mini-batch from its loss mask [B, T] (before micro-batching).

        With `process_group`, counts are summed over its ranks (each rank passes its own part of the
        mini-batch) and `scale` becomes the group size; the default norm_length is then the largest
        padded length over the ranks. Pass a constant `norm_length` (the generation budget) for Dr.GRPO.
        """
        _check_mask(mask)
        valid = mask.bool()
        counts = torch.stack([valid.sum(), valid.any(-1).sum(),
                              torch.tensor(mask.shape[-1], device=mask.device)]).double()
        scale = 1.0
        if process_group is not None:
            totals = counts[:2].clone()
            longest = counts[2:].clone()
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=process_group)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=process_group)
            counts = torch.cat([totals, longest])
            scale = float(dist.get_world_size(process_group))
        num_tokens, num_seqs, length = (float(c) for c in counts.tolist())
        return cls(mode=mode, num_tokens=num_tokens, num_seqs=num_seqs,
                   norm_length=float(norm_length if norm_length is not None else length), scale=scale)

    def __call__(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the mini-batch loss; `values` and `mask` are [B, T]."""
        _check_mask(mask)
        if values.shape != mask.shape:
            raise ValueError(f"values shape {tuple(values.shape)} must equal mask shape {tuple(mask.shape)}")
        valid = mask.bool()
        masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.mode == "token-mean":
            total = masked.sum() / max(self.num_tokens, 1.0)
        elif self.mode == "seq-mean-token-mean":
            per_seq = masked.sum(-1) / valid.sum(-1).clamp(min=1).to(values.dtype)
            total = per_seq.sum() / max(self.num_seqs, 1.0)
        elif self.mode == "seq-mean-token-sum":
            total = masked.sum() / max(self.num_seqs, 1.0)
        else:
            total = masked.sum() / (max(self.num_seqs, 1.0) * self.norm_length)
        return total * self.scale


def _check_mask(mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, T] tensor (sequences x response tokens), got {got}")
