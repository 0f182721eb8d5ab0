"""How rollouts are sampled: a torch-free dataclass, so configurations can embed it cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. temperature 0 means greedy decoding."""

    max_new_tokens: int = 64
    """Response-length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature (training also divides both logit streams of the loss by it)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
