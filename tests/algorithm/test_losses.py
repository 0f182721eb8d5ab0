"""Losses against direct formulas, aggregation with micro-batching, metrics, and the direction of a step."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast.algorithm import (
    AGG_MODES,
    Aggregator,
    LossConfig,
    Metrics,
    TokenBatch,
    blend_advantages,
    compute_loss,
    grpo_advantages,
    importance_weight,
    kl_penalty,
    ppo_clip_loss,
)
from sdpo_fast.distill import linear_distill
from tests.conftest import IGNORE, op_inputs

F64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def _mask(b=7, t=9, seed=0):
    m = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.7
    m[2] = False  # a sequence with no token
    m[4, 0] = True
    return m


# ---- building blocks against direct formulas --------------------------------------------------------

def test_importance_weight():
    logp = torch.tensor([-1.0, -2.0, -0.5, 30.0, -40.0], dtype=F64, requires_grad=True)
    old = torch.tensor([-1.0, -1.0, -1.5, 0.0, 0.0], dtype=F64)
    w = importance_weight(logp, old, 2.0)
    expected = [1.0, math.exp(-1.0), 2.0, 2.0, math.exp(-20.0)]  # clamp(+-20), then cap at is_clip
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
    assert not w.requires_grad
    assert torch.equal(importance_weight(logp, None, 2.0), torch.ones(5, dtype=F64))
    assert torch.equal(importance_weight(logp, old, None), torch.ones(5, dtype=F64))


def test_grpo_advantages():
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 0.3, 0.2, 0.2]
    groups = ["a", "b", "a", "b", "a", "c", "d", "d"]  # c: a group of one; d: zero std
    for norm in (True, False):
        got = grpo_advantages(rewards, groups, norm_by_std=norm)
        for i, (r, g) in enumerate(zip(rewards, groups)):
            members = torch.tensor([rr for rr, gg in zip(rewards, groups) if gg == g], dtype=F64)
            mean, std = (members.mean(), members.std()) if len(members) > 1 else (0.0, 1.0)
            want = (r - mean) / (std + 1e-6) if norm else r - mean
            assert got[i].item() == pytest.approx(float(want), rel=1e-6, abs=1e-6)
    assert grpo_advantages(rewards, groups).dtype == torch.float32
    numeric = torch.tensor([0, 1, 0, 1, 0, 2, 3, 3])  # the same groups as a tensor of ids
    assert torch.equal(grpo_advantages(torch.tensor(rewards), numeric), grpo_advantages(rewards, groups))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages([1.0, 2.0], ["a"])


def _ppo_direct(logp, old, adv, eps_low, eps_high, c):
    """Element-by-element PPO objective with dual clip, written out case by case."""
    out = []
    for lp, o, a in zip(logp, old, adv):
        r = torch.exp(torch.clamp(lp - o, -20, 20))
        surrogate = torch.minimum(a * r, a * torch.clamp(r, 1 - eps_low, 1 + eps_high))
        if c is not None and a < 0:
            surrogate = torch.maximum(surrogate, c * a)
        out.append(-surrogate)
    return torch.stack(out)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_clip_loss_values_and_gradients(dual_clip):
    n = 64
    old = _rand(n, seed=1)
    logp = (old + _rand(n, seed=2, scale=1.2)).requires_grad_()
    logp_ref = logp.detach().clone().requires_grad_()
    adv = _rand(n, seed=3)
    loss, info = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    want = _ppo_direct(logp_ref, old, adv, 0.2, 0.28, dual_clip)
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    (g_ref,) = torch.autograd.grad(want.sum(), logp_ref)
    torch.testing.assert_close(g, g_ref)
    r = (logp - old).exp().detach()
    assert torch.equal(info["clip_high"], (adv > 0) & (r > 1.28))
    assert torch.equal(info["clip_low"], (adv < 0) & (r < 0.8))
    assert info["clip_high"].any() and info["clip_low"].any()
    if dual_clip is not None:
        assert torch.equal(info["dual_clip"], (adv < 0) & (r > dual_clip))
        assert info["dual_clip"].any()


def test_kl_penalty():
    logp, ref = _rand(20, seed=4), _rand(20, seed=5)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    assert kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "k3").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k4")


def test_blend_advantages():
    g, s = _rand(6, 1, seed=6), _rand(6, 4, seed=7, scale=10)
    torch.testing.assert_close(blend_advantages(g, s, 0.9), 0.9 * g + 0.1 * s)
    torch.testing.assert_close(blend_advantages(g, s, 0.9, clip=0.5), (0.9 * g + 0.1 * s).clamp(-0.5, 0.5))


# ---- compute_loss against direct formulas -----------------------------------------------------------

def _batch(b=7, t=9):
    mask = _mask(b, t)
    return dict(
        mask=mask,
        student_logp=(-_rand(b, t, seed=10).abs()).requires_grad_(),
        old_logp=-_rand(b, t, seed=11).abs(),
        divergence=_rand(b, t, seed=12).abs().requires_grad_(),
        teacher_logp=-_rand(b, t, seed=13).abs(),
        sd_mask=torch.tensor([1, 0, 1, 1, 0, 1, 1][:b], dtype=torch.float32),
        advantages=_rand(b, seed=14),
        ref_logp=-_rand(b, t, seed=15).abs(),
        entropy=_rand(b, t, seed=16).abs(),
    )


def _token_mean(x, m):
    return (x * m).sum() / m.sum()


@pytest.mark.parametrize("mode", ["sdpo", "sdpo_token", "grpo", "blend"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_compute_loss_matches_direct_formula(mode, kl_coef):
    cfg = LossConfig(mode=mode, alpha=1.0 if mode == "sdpo_token" else 0.5, is_clip=2.0, eps_low=0.2,
                     eps_high=0.28, dual_clip=3.0, kl_coef=kl_coef, blend_lambda=0.9,
                     adv_clip=None if mode == "sdpo" else 1.5)  # "sdpo" clips inside linear_distill
    f = _batch()
    mask = cfg.loss_mask(f["mask"], f["sd_mask"])
    m = mask.to(F64)
    metrics = Metrics()
    loss = compute_loss(cfg, Aggregator.for_batch(mask, cfg.agg_mode), TokenBatch(**{**f, "mask": mask}), metrics)

    logp, old = f["student_logp"], f["old_logp"]
    w = torch.minimum(torch.exp(torch.clamp(logp.detach() - old, -20, 20)), torch.tensor(2.0, dtype=F64))
    a_sdpo = f["teacher_logp"] - logp.detach()
    if mode == "sdpo":
        per_token = f["divergence"] * w
    elif mode == "sdpo_token":
        assert (a_sdpo.abs() > 1.5).any()
        per_token = -a_sdpo.clamp(-1.5, 1.5) * logp * w
    else:
        adv = f["advantages"][:, None].expand(-1, 9)
        if mode == "blend":
            adv = (0.9 * adv + 0.1 * a_sdpo * f["sd_mask"][:, None]).clamp(-1.5, 1.5)
        per_token = _ppo_direct(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), 0.2, 0.28, 3.0).reshape(7, 9)
    if kl_coef:
        d = f["ref_logp"] - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    want = _token_mean(per_token, m)
    torch.testing.assert_close(loss, want)
    # "sdpo" without KL: the weight is detached, so gradients reach the divergence only
    inputs = {"sdpo": [f["divergence"]] + ([logp] if kl_coef else [])}.get(mode, [logp])
    for g, g_ref in zip(torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g, g_ref)
    if mode in ("sdpo", "sdpo_token"):  # the pure SDPO modes average over rows with a teacher only
        assert mask[1].sum() == 0 and mask[0].sum() == f["mask"][0].sum()
    stats = metrics.summary()
    assert stats["loss/entropy/mean"] == pytest.approx(_token_mean(f["entropy"], m).item())
    if mode in ("grpo", "blend"):
        assert 0.0 < stats["loss/clip_high_frac/mean"] + stats["loss/clip_low_frac/mean"] < 1.0
    else:
        assert stats["loss/is_weight/mean"] == pytest.approx(_token_mean(w, m).item())


def test_sdpo_token_gradient_is_the_policy_gradient_with_teacher_advantage():
    f = _batch()
    cfg = LossConfig(mode="sdpo_token", alpha=1.0, is_clip=None)
    mask = cfg.loss_mask(f["mask"], f["sd_mask"])
    loss = compute_loss(cfg, Aggregator.for_batch(mask), TokenBatch(mask=mask, student_logp=f["student_logp"],
                                                                      teacher_logp=f["teacher_logp"]))
    (g,) = torch.autograd.grad(loss, f["student_logp"])
    a = f["teacher_logp"] - f["student_logp"].detach()
    torch.testing.assert_close(g, -a * mask / mask.sum())


def test_loss_config_and_batch_validation():
    with pytest.raises(ValueError, match="mode"):
        LossConfig(mode="ppo")
    with pytest.raises(ValueError, match="alpha=1"):
        LossConfig(mode="sdpo_token", alpha=0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        LossConfig(dual_clip=0.9)
    with pytest.raises(ValueError, match="is_clip"):
        LossConfig(is_clip=0.0)
    with pytest.raises(ValueError, match="agg_mode"):
        LossConfig(agg_mode="sum")
    with pytest.raises(ValueError, match="eps_low"):
        LossConfig(eps_low=float("nan"))
    with pytest.raises(ValueError, match="adv_clip"):
        LossConfig(mode="sdpo", alpha=0.5, topk=20, adv_clip=5.0)
    with pytest.raises(ValueError, match="adv_clip"):
        LossConfig(mode="sdpo", alpha=1.0, topk=None, adv_clip=5.0)
    assert LossConfig(mode="sdpo", alpha=1.0, topk=20, adv_clip=5.0).distill_kwargs()["adv_clip"] == 5.0
    assert LossConfig(mode="blend", adv_clip=5.0).distill_kwargs()["adv_clip"] is None
    f = _batch()
    agg = Aggregator.for_batch(f["mask"])
    with pytest.raises(ValueError, match="divergence"):
        compute_loss(LossConfig(), agg, TokenBatch(mask=f["mask"], student_logp=f["student_logp"]))
    with pytest.raises(ValueError, match="ref_logp"):
        compute_loss(LossConfig(kl_coef=0.1), agg,
                     TokenBatch(mask=f["mask"], student_logp=f["student_logp"], divergence=f["divergence"]))
    with pytest.raises(ValueError, match="advantages"):
        compute_loss(LossConfig(mode="grpo"), agg, TokenBatch(mask=f["mask"], student_logp=f["student_logp"],
                                                              advantages=torch.zeros(3)))
    with pytest.raises(ValueError, match="aggregator mode"):
        compute_loss(LossConfig(), Aggregator.for_batch(f["mask"], "seq-mean-token-sum"),
                     TokenBatch(mask=f["mask"], student_logp=f["student_logp"], divergence=f["divergence"]))


# ---- aggregation and micro-batching -----------------------------------------------------------------

def _agg_direct(values, mask, mode, norm_length):
    m = mask.to(values.dtype)
    has = mask.any(-1)
    if mode == "token-mean":
        return (values * m).sum() / m.sum()
    if mode == "seq-mean-token-mean":
        return ((values * m).sum(-1)[has] / m.sum(-1)[has]).mean()
    if mode == "seq-mean-token-sum":
        return (values * m).sum(-1)[has].mean()
    return (values * m).sum(-1)[has].mean() / norm_length


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batched_aggregation_equals_full_batch(mode):
    values = _rand(7, 9, seed=20).requires_grad_()
    mask = _mask()
    values_nan = values.detach().clone()
    values_nan[~mask] = float("nan")  # masked entries never leak into the result
    agg = Aggregator.for_batch(mask, mode)
    full = agg(values, mask)
    torch.testing.assert_close(full, _agg_direct(values, mask, mode, 9.0), rtol=1e-12, atol=0)
    assert torch.isfinite(agg(values_nan, mask))
    (g_full,) = torch.autograd.grad(full, values)
    total, grad = 0.0, torch.zeros_like(values)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 7)):  # uneven micro-batches, one with an empty row
        part = values.detach()[rows].clone().requires_grad_()
        share = agg(part, mask[rows])
        share.backward()
        total = total + share.detach()
        grad[rows] = part.grad
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, g_full, rtol=1e-12, atol=1e-15)


def test_norm_length_and_empty_batch():
    mask = _mask()
    agg = Aggregator.for_batch(mask, "seq-mean-token-sum-norm", norm_length=4096)
    assert agg.norm_length == 4096.0 and agg.num_seqs == 6 and agg.num_tokens == mask.sum().item()
    empty = torch.zeros(3, 5, dtype=torch.bool)
    for mode in AGG_MODES:  # nothing to learn from: a zero loss, never NaN
        assert Aggregator.for_batch(empty, mode)(_rand(3, 5), empty).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        Aggregator.for_batch(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="values shape"):
        agg(_rand(7, 8), mask)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_sdpo_step_through_linear_distill_micro_batched_equals_full_batch(agg_mode):
    """The whole path (fused op -> loss -> aggregation): micro-batch gradients add up to the full batch."""
    b, t, hidden, vocab = 6, 5, 8, 29
    h_s, h_t, weight, _, y = op_inputs(30, n=t, h=hidden, v=vocab, lead=(b,), separate_head=False,
                                       head_scale=hidden**0.5, ignore_frac=0.2)
    weight.requires_grad_(True)
    response_mask = y != IGNORE
    sd_mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    old = -torch.rand(b, t, dtype=F64, generator=torch.Generator().manual_seed(31))
    cfg = LossConfig(mode="sdpo", alpha=0.5, agg_mode=agg_mode)
    mask = cfg.loss_mask(response_mask, sd_mask)
    agg = Aggregator.for_batch(mask, agg_mode)

    def share(rows):
        out = linear_distill(h_s[rows], h_t[rows], weight, y[rows], impl="chunked", **cfg.distill_kwargs())
        return compute_loss(cfg, agg, TokenBatch.from_distill(out, mask[rows], old_logp=old[rows]))

    full = share(slice(None))
    (g_full,) = torch.autograd.grad(full, weight)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = share(rows)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(weight.grad, g_full, rtol=1e-10, atol=1e-13)


def test_metrics_combine_exactly_over_micro_batches():
    values, mask = _rand(7, 9, seed=40), _mask()
    whole, parts = Metrics(), Metrics()
    whole.add("x", values, mask)
    for rows in (slice(0, 3), slice(3, 7)):
        parts.add("x", values[rows], mask[rows])
    parts.add("empty", values[:1], torch.zeros(1, 9, dtype=torch.bool))
    a, b = whole.summary(), parts.summary()
    assert set(b) == set(a)  # a name without entries reports nothing
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12)
    sel = values[mask]
    assert a["x/mean"] == pytest.approx(sel.mean().item())
    assert a["x/std"] == pytest.approx(sel.std(unbiased=False).item())
    assert (a["x/min"], a["x/max"]) == (sel.min().item(), sel.max().item())


# ---- direction: one optimizer step moves the student towards the teacher ------------------------------

@pytest.mark.parametrize("mode, alpha, topk", [("sdpo", 0.0, None), ("sdpo", 0.5, None), ("sdpo", 1.0, None),
                                               ("sdpo", 0.5, 4), ("sdpo_token", 1.0, None)])
def test_one_step_raises_teacher_preferred_and_lowers_disfavoured_tokens(mode, alpha, topk):
    n, hidden, vocab, good, bad = 24, 6, 11, 3, 7
    g = torch.Generator().manual_seed(50)
    h = torch.randn(n, hidden, generator=g)
    h[:, 0] = h[:, 0].abs() + 0.5  # every row has a positive first feature
    weight = torch.nn.Parameter(0.3 * torch.randn(vocab, hidden, generator=g))
    teacher_weight = weight.detach().clone()
    teacher_weight[good, 0] += 2.0  # the teacher prefers `good` and disfavours `bad` on every row
    teacher_weight[bad, 0] -= 2.0
    # sampled tokens: the sampled-token form only moves the tokens it sees
    y = torch.where(torch.arange(n) % 2 == 0, good, bad)

    def logp():
        return (h @ weight.T).log_softmax(-1)

    before = logp().detach()
    cfg = LossConfig(mode=mode, alpha=alpha, topk=topk)
    out = linear_distill(h, h, weight, y, teacher_weight=teacher_weight, impl="chunked", **cfg.distill_kwargs())
    mask = torch.ones(n, 1, dtype=torch.bool)
    loss = compute_loss(cfg, Aggregator.for_batch(mask), TokenBatch.from_distill(out.reshape(n, 1), mask))
    opt = torch.optim.SGD([weight], lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    change = logp().detach() - before
    # The head is shared by all rows, so single rows may move against the trend; the mean may not.
    # The logit-level loss moves every row's distribution; the sampled-token form the sampled tokens.
    rows_good = slice(None) if mode == "sdpo" else y == good
    rows_bad = slice(None) if mode == "sdpo" else y == bad
    assert change[rows_good, good].mean() > 0
    assert change[rows_bad, bad].mean() < 0
