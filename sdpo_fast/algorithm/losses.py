"""SDPO and GRPO-compatible policy losses on per-token tensors.

Building blocks (plain tensors in, per-token tensors out):
- `importance_weight`: w = min(exp(clamp(logp - logp_old, -20, 20)), is_clip), detached.
- `grpo_advantages`: group-normalised rewards (optionally divided by the group's std).
- `ppo_clip_loss`: clipped-ratio objective with separate eps_low / eps_high and optional dual clip.
- `kl_penalty`: k1 / k2 / k3 estimators of KL(policy || reference).
- `blend_advantages`: A = lambda A_GRPO + (1 - lambda) A_SDPO, optionally clipped.

`compute_loss` assembles one micro-batch's loss for a `LossConfig` mode:
- "sdpo":       logit-level: divergence from `linear_distill` times the importance weight.
- "sdpo_token": sampled-token form (reverse KL, alpha = 1): A_t = log p_T(y_t) - log p_S(y_t),
                loss_t = -A_t * log p_S(y_t) * w_t, A and w detached.
In both SDPO modes `adv_clip` clamps the advantages to [-adv_clip, adv_clip] (the paper's test-time
setting): A_t above, or, logit-level, every support token's advantage inside `linear_distill`.
- "grpo":       clipped policy gradient on group-normalised rewards.
- "blend":      clipped policy gradient on the blended advantage.
plus an optional KL-to-reference term, aggregated by an `Aggregator` built for the whole mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from sdpo_fast.algorithm.aggregation import Aggregator
from sdpo_fast.algorithm.config import KL_TYPES, LOSS_MODES, LossConfig  # noqa: F401  (re-exported)
from sdpo_fast.algorithm.groups import group_index
from sdpo_fast.algorithm.metrics import Metrics
from sdpo_fast.distill import DistillOutput

LOG_RATIO_CLAMP = 20.0


def importance_weight(logp: torch.Tensor, old_logp: torch.Tensor | None, is_clip: float | None) -> torch.Tensor:
    """w = min(exp(clamp(logp - old_logp, -20, 20)), is_clip), detached; ones on-policy or without a clip."""
    if old_logp is None or is_clip is None:
        return torch.ones_like(logp).detach()
    log_ratio = (logp.detach() - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=float(is_clip))


def grpo_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-rollout GRPO advantage (r - mean_g) / (std_g + eps), or r - mean_g without std normalisation.

    Groups are the rollouts sharing a group id; std is the unbiased sample std. A group of one rollout
    uses mean 0 and std 1 (as the reference does). Call it on the whole batch, before micro-batching.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if r.numel() != len(group_ids):
        raise ValueError(f"rewards ({r.numel()}) and group_ids ({len(group_ids)}) must have one entry per rollout")
    g = torch.tensor(group_index(group_ids), dtype=torch.long)
    count = torch.bincount(g).double()
    mean = torch.zeros_like(count).index_add_(0, g, r) / count
    sq = torch.zeros_like(count).index_add_(0, g, (r - mean[g]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    adv = r - mean[g]
    if norm_by_std:
        adv = adv / (std[g] + eps)
    return adv.float()


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)).

    r = exp(clamp(logp - old_logp, -20, 20)). With `dual_clip` = c > 1, tokens with A < 0 are further
    bounded by -A c. Returns the loss and boolean masks of the tokens each clip silenced (for metrics).
    """
    ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    a = advantages.detach()
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    info = {"clip_high": (a > 0) & (r > 1.0 + eps_high), "clip_low": (a < 0) & (r < 1.0 - eps_low),
            "ratio": r}
    if dual_clip is not None:
        bound = -a * dual_clip
        info["dual_clip"] = (a < 0) & (loss.detach() > bound)
        loss = torch.where(a < 0, torch.minimum(loss, bound), loss)
    return loss, info


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimator of KL(policy || reference) from sampled-token log-probs.

    k1: logp - ref; k2: (logp - ref)^2 / 2; k3 (low variance): e^d - d - 1 with d = ref - logp clamped
    to [-20, 20], the result clamped to [-10, 10].
    """
    if kind not in KL_TYPES:
        raise ValueError(f"kind must be one of {KL_TYPES}, got {kind!r}")
    diff = logp - ref_logp.detach()
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    d = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


def blend_advantages(
    grpo: torch.Tensor, sdpo: torch.Tensor, lam: float = 0.9, clip: float | None = None
) -> torch.Tensor:
    """lam * A_GRPO + (1 - lam) * A_SDPO (broadcast), clipped to [-clip, clip] when `clip` is set."""
    adv = lam * grpo.detach() + (1.0 - lam) * sdpo.detach()
    return adv.clamp(-clip, clip) if clip is not None else adv


@dataclass
class TokenBatch:
    """Per-token inputs of one micro-batch, all [B, T] unless noted.

    mask: `LossConfig.loss_mask(...)` rows of this micro-batch.
    student_logp: log p_S(y_t), with grad. old_logp: the behaviour policy's log-probs (None: on-policy).
    divergence: per-token divergence with grad ("sdpo"). teacher_logp: log p_T(y_t) ("sdpo_token",
    "blend"; optional otherwise, for metrics). sd_mask: [B] self-distillation mask ("blend": rows
    without a teacher get A_SDPO = 0). advantages: [B] sequence-level GRPO advantages ("grpo",
    "blend"). ref_logp: reference-policy log-probs (kl_coef > 0). entropy: for metrics only.
    """

    mask: torch.Tensor
    student_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    divergence: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None
    sd_mask: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @classmethod
    def from_distill(cls, out: DistillOutput, mask: torch.Tensor, **fields) -> "TokenBatch":
        """A batch from `linear_distill`'s [B, T] output (student/teacher log-probs, divergence, entropy)."""
        return cls(mask=mask, student_logp=out.student_logp, divergence=out.divergence,
                   teacher_logp=out.teacher_logp, entropy=out.entropy, **fields)


def compute_loss(cfg: LossConfig, agg: Aggregator, batch: TokenBatch, metrics: Metrics | None = None) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss (sum the shares, or backward each one)."""
    if agg.mode != cfg.agg_mode:
        raise ValueError(f"aggregator mode {agg.mode!r} differs from cfg.agg_mode {cfg.agg_mode!r}")
    _check_batch(cfg, batch)
    mask = batch.mask.bool()
    logp = batch.student_logp
    sdpo_adv = None
    if batch.teacher_logp is not None:
        sdpo_adv = (batch.teacher_logp - logp).detach()

    if cfg.mode in ("sdpo", "sdpo_token"):
        w = importance_weight(logp, batch.old_logp, cfg.is_clip)
        if cfg.mode == "sdpo":
            per_token = batch.divergence * w
        else:
            adv = sdpo_adv.clamp(-cfg.adv_clip, cfg.adv_clip) if cfg.adv_clip is not None else sdpo_adv
            per_token = -adv * logp * w
        if metrics is not None and batch.old_logp is not None and cfg.is_clip is not None:
            metrics.add("loss/is_weight", w, mask)
            metrics.add("loss/is_clip_frac", (w >= cfg.is_clip).double(), mask)
    else:
        adv = batch.advantages.detach().unsqueeze(-1).expand_as(logp)
        if cfg.mode == "blend":
            if batch.sd_mask is not None:  # rows without a teacher: A_SDPO = 0 (their scores are unused)
                sdpo_adv = torch.where(batch.sd_mask.bool().unsqueeze(-1), sdpo_adv, 0.0)
            adv = blend_advantages(adv, sdpo_adv, cfg.blend_lambda, cfg.adv_clip)
        old = batch.old_logp if batch.old_logp is not None else logp.detach()
        per_token, info = ppo_clip_loss(logp, old, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                        dual_clip=cfg.dual_clip)
        if metrics is not None:
            metrics.add("loss/advantage", adv, mask)
            metrics.add("loss/ratio", info["ratio"], mask)
            for key in ("clip_high", "clip_low", "dual_clip"):
                if key in info:
                    metrics.add(f"loss/{key}_frac", info[key].double(), mask)

    if cfg.kl_coef > 0:
        kl = kl_penalty(logp, batch.ref_logp, cfg.kl_type)
        per_token = per_token + cfg.kl_coef * kl
        if metrics is not None:
            metrics.add("loss/kl", kl, mask)

    loss = agg(per_token, mask)
    if metrics is not None:
        if batch.divergence is not None:
            metrics.add("loss/divergence", batch.divergence, mask)
        if sdpo_adv is not None:
            metrics.add("loss/sdpo_advantage", sdpo_adv, mask)
        if batch.entropy is not None:
            metrics.add("loss/entropy", batch.entropy, mask)
    return loss


def _check_batch(cfg: LossConfig, batch: TokenBatch) -> None:
    needed = {"sdpo": ("divergence",), "sdpo_token": ("teacher_logp",), "grpo": ("advantages",),
              "blend": ("advantages", "teacher_logp")}[cfg.mode]
    if cfg.kl_coef > 0:
        needed += ("ref_logp",)
    for name in needed:
        if getattr(batch, name) is None:
            raise ValueError(f"mode {cfg.mode!r} (kl_coef={cfg.kl_coef}) needs TokenBatch.{name}")
    shape = batch.student_logp.shape
    if batch.student_logp.dim() != 2:
        raise ValueError(f"student_logp must be [B, T], got {tuple(shape)}")
    for name in ("mask", "old_logp", "divergence", "teacher_logp", "ref_logp", "entropy"):
        t = getattr(batch, name)
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal student_logp shape {tuple(shape)}")
    for name in ("sd_mask", "advantages"):
        t = getattr(batch, name)
        if t is not None and t.shape != shape[:1]:
            raise ValueError(f"{name} must be [B={shape[0]}], got {tuple(t.shape)}")
