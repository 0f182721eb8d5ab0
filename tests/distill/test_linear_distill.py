"""linear_distill (naive and chunked) against a float64 reference: values, gradients, edge cases, errors."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo_fast import DistillOutput, linear_distill
from sdpo_fast.distill.api import _resolve_impl
from sdpo_fast.distill.chunked import linear_distill_chunked
from sdpo_fast.distill.naive import linear_distill_naive
from tests.conftest import IGNORE, op_inputs

N, H, V = 37, 24, 101  # non-powers of two


# float32 inputs of the file's shapes, every fourth row ignored (any op_inputs argument can be overridden)
make_inputs = functools.partial(op_inputs, n=N, h=H, v=V, dtype=torch.float32, ignore_every=4)


def run(fn, hs, hh, w, wt, y, grads, **kw):
    """Outputs and gradients (student hidden, weight) under per-token upstream gradients `grads`."""
    hs = hs.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = fn(hs, hh, w, y, teacher_weight=wt, **kw)
    g_div, g_logp = grads
    loss = (out.divergence * g_div.to(out.divergence.dtype)).sum() + \
        (out.student_logp * g_logp.to(out.divergence.dtype)).sum()
    grad_h, grad_w = torch.autograd.grad(loss, (hs, w), allow_unused=True)
    return out, grad_h, grad_w


def reference(hs, hh, w, wt, y, grads, **kw):
    to64 = (lambda t: None if t is None else t.double())
    return run(linear_distill, to64(hs), to64(hh), to64(w), to64(wt), y, grads, impl="naive", **kw)


def upstream(seed, n=N):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close_to_reference(got, ref, *, atol=2e-5, grad_rtol=2e-5):
    out, gh, gw = got
    rout, rgh, rgw = ref
    for name, a, b in zip(DistillOutput._fields, out, rout):
        assert torch.isfinite(a).all(), name
        assert max_abs(a, b) <= atol * (1 + b.abs().max().item()), (name, max_abs(a, b))
    assert rel_err(gh, rgh) <= grad_rtol, rel_err(gh, rgh)
    assert rel_err(gw, rgw) <= grad_rtol, rel_err(gw, rgw)


ALPHAS = [0.0, 0.3, 0.5, 1.0]
SUPPORTS = [(None, True), (5, True), (5, False)]


@pytest.mark.parametrize("alpha,temperature,support,separate_head",
                         list(itertools.product(ALPHAS, [1.0, 0.7], SUPPORTS, [False, True])))
def test_chunked_fp32_matches_float64_reference(alpha, temperature, support, separate_head):
    topk, add_tail = support
    seed = hash((alpha, temperature, support, separate_head)) % 10_000
    inputs = make_inputs(seed, separate_head=separate_head)
    kw = dict(alpha=alpha, temperature=temperature, topk=topk, add_tail=add_tail)
    grads = upstream(seed)
    got = run(lambda *a, **k: linear_distill_chunked_multi(*a, **k), *inputs, grads, **kw)
    assert_close_to_reference(got, reference(*inputs, grads, **kw))


def linear_distill_chunked_multi(hs, hh, w, y, *, teacher_weight=None, **kw):
    """Chunked with 7 rows per chunk, so every call crosses several chunk boundaries."""
    wt = w if teacher_weight is None else teacher_weight
    return linear_distill_chunked(hs, hh, w, wt, y, ignore_index=IGNORE, chunk_elems=7 * w.shape[0], **kw)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("support", SUPPORTS)
def test_chunked_float64_equals_naive_float64(alpha, support):
    inputs = make_inputs(11, dtype=torch.float64, teacher_h=13)
    kw = dict(alpha=alpha, temperature=0.9, topk=support[0], add_tail=support[1])
    grads = upstream(11)
    got = run(linear_distill_chunked_multi, *inputs, grads, **kw)
    assert_close_to_reference(got, reference(*inputs, grads, **kw), atol=1e-11, grad_rtol=1e-11)


@pytest.mark.parametrize("alpha,topk", [(0.0, None), (0.5, None), (1.0, None), (0.5, 4), (1.0, 4)])
def test_chunked_gradcheck(alpha, topk):
    hs, hh, w, wt, y = make_inputs(3, n=9, h=5, v=23, dtype=torch.float64)

    def f(hs, w):
        out = linear_distill_chunked(hs, hh, w, wt, y, alpha=alpha, temperature=0.8, topk=topk, add_tail=True,
                                     ignore_index=IGNORE, chunk_elems=4 * 23)
        return out.divergence, out.student_logp

    assert torch.autograd.gradcheck(f, (hs.requires_grad_(), w.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_large_common_logit_offset(impl, alpha):
    inputs = make_inputs(5, offsets=(50.0, 50.0))
    grads = upstream(5)
    got = run(linear_distill, *inputs, grads, alpha=alpha, impl=impl)
    assert_close_to_reference(got, reference(*inputs, grads, alpha=alpha), atol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("alpha,topk", [(0.0, None), (0.5, None), (1.0, None), (0.5, 5)])
def test_very_peaked_distributions(impl, alpha, topk):
    inputs = make_inputs(6, hidden_scale=40.0)  # logit spreads of hundreds: most probabilities underflow to 0
    grads = upstream(6)
    got = run(linear_distill, *inputs, grads, alpha=alpha, topk=topk, impl=impl)
    assert_close_to_reference(got, reference(*inputs, grads, alpha=alpha, topk=topk), atol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("topk", [None, 5])
def test_all_rows_ignored_gives_zeros_and_zero_grads(impl, topk):
    hs, hh, w, wt, _ = make_inputs(7)
    y = torch.full((N,), IGNORE)
    out, gh, gw = run(linear_distill, hs, hh, w, wt, y, upstream(7), topk=topk, impl=impl)
    for t in out:
        assert torch.equal(t, torch.zeros_like(t))
    for g in (gh, gw):
        assert g is None or (torch.isfinite(g).all() and not g.any())


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_ignored_rows_are_zero_and_get_no_gradient(impl):
    hs, hh, w, wt, y = make_inputs(8)
    out, gh, _ = run(linear_distill, hs, hh, w, wt, y, upstream(8), impl=impl)
    ignored = y == IGNORE
    for t in out:
        assert not t[ignored].any()
    assert not gh[ignored].any()
    assert gh[~ignored].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("separate_head", [False, True])
def test_no_gradient_reaches_the_teacher(impl, separate_head):
    hs, hh, w, wt, y = make_inputs(9, separate_head=separate_head)
    hh.requires_grad_(True)
    if wt is not None:
        wt.requires_grad_(True)
    w.requires_grad_(True)
    out = linear_distill(hs, hh, w, y, teacher_weight=wt, impl=impl)
    (out.divergence.sum() + out.student_logp.sum()).backward()
    assert hh.grad is None
    assert wt is None or wt.grad is None
    assert w.grad is not None and torch.isfinite(w.grad).all()
    for t in (out.teacher_logp, out.advantage, out.entropy):
        assert not t.requires_grad


@pytest.mark.parametrize("use", ["divergence", "student_logp"])
def test_gradient_of_one_output_alone(use):
    inputs = make_inputs(10)
    n = inputs[0].shape[0]
    zeros, ones = torch.zeros(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    grads = (ones, zeros) if use == "divergence" else (zeros, ones)

    def only(fn):
        def call(hs, hh, w, y, **kw):
            out = fn(hs, hh, w, y, **kw)
            return out._replace(**{f: getattr(out, f).detach() for f in ("divergence", "student_logp") if f != use})
        return call

    got = run(only(linear_distill), *inputs, grads, impl="chunked")
    assert_close_to_reference(got, reference(*inputs, grads))


@pytest.mark.parametrize("alpha,topk", [(0.0, None), (0.5, None), (1.0, None), (0.5, 5), (1.0, 5)])
def test_bf16_no_worse_than_plain_torch_bf16(alpha, topk):
    """bf16 inputs: chunked's error vs the float64 reference is at most the naive bf16 baseline's + tol."""
    inputs = make_inputs(12, dtype=torch.bfloat16, n=53, v=211, h=48)
    grads = upstream(12, n=53)
    kw = dict(alpha=alpha, topk=topk)
    ref = reference(*inputs, grads, **kw)
    base = run(linear_distill, *inputs, grads, impl="naive", **kw)
    got = run(linear_distill, *inputs, grads, impl="chunked", **kw)
    for name, a, b, r in zip(DistillOutput._fields, got[0], base[0], ref[0]):
        assert a.dtype == torch.float32, name
        assert max_abs(a, r) <= max_abs(b, r) + 2e-3, (name, max_abs(a, r), max_abs(b, r))
    for a, b, r in zip(got[1:], base[1:], ref[1:]):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, r) <= rel_err(b, r) + 2e-3, (rel_err(a, r), rel_err(b, r))


def test_naive_matches_independent_formulas():
    """The specification itself, checked against torch's own KL and symmetry facts."""
    hs, hh, w, wt, y = make_inputs(13, dtype=torch.float64, ignore_every=0)
    logp_s = (hs @ w.T).log_softmax(-1)
    logp_t = (hh @ wt.T).log_softmax(-1)
    kl_ts = F.kl_div(logp_s, logp_t, reduction="none", log_target=True).sum(-1)
    kl_st = F.kl_div(logp_t, logp_s, reduction="none", log_target=True).sum(-1)
    fwd = linear_distill(hs, hh, w, y, teacher_weight=wt, alpha=0.0, impl="naive")
    rev = linear_distill(hs, hh, w, y, teacher_weight=wt, alpha=1.0, impl="naive")
    torch.testing.assert_close(fwd.divergence, kl_ts)
    torch.testing.assert_close(rev.divergence, kl_st)
    # JSD at alpha = 0.5 is symmetric in student and teacher
    jsd_st = linear_distill(hs, hh, w, y, teacher_weight=wt, alpha=0.5, impl="naive").divergence
    jsd_ts = linear_distill(hh, hs, wt, y, teacher_weight=w, alpha=0.5, impl="naive").divergence
    torch.testing.assert_close(jsd_st, jsd_ts)
    # Top-V without tail renormalises nothing away: equal to the full-vocabulary divergence
    full_v = linear_distill(hs, hh, w, y, teacher_weight=wt, alpha=0.3, topk=V, add_tail=False, impl="naive")
    full = linear_distill(hs, hh, w, y, teacher_weight=wt, alpha=0.3, impl="naive")
    torch.testing.assert_close(full_v.divergence, full.divergence)
    # Token log-probs, advantage and entropy
    torch.testing.assert_close(fwd.student_logp, logp_s.gather(-1, y[:, None]).squeeze(-1))
    torch.testing.assert_close(fwd.advantage, fwd.teacher_logp - fwd.student_logp)
    torch.testing.assert_close(fwd.entropy, -(logp_s.exp() * logp_s).sum(-1))


def test_leading_batch_dimensions():
    hs, hh, w, wt, y = make_inputs(14, n=30)
    flat = linear_distill(hs, hh, w, y, teacher_weight=wt, impl="chunked")
    batched = linear_distill(hs.view(5, 6, -1), hh.view(5, 6, -1), w, y.view(5, 6), teacher_weight=wt,
                             impl="chunked")
    for a, b in zip(flat, batched):
        assert b.shape == (5, 6)
        torch.testing.assert_close(a, b.reshape(-1))


def test_int32_targets_accepted():
    hs, hh, w, wt, y = make_inputs(15)
    a = linear_distill(hs, hh, w, y, teacher_weight=wt, impl="chunked")
    b = linear_distill(hs, hh, w, y.int(), teacher_weight=wt, impl="chunked")
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z)


def test_auto_is_chunked_on_cpu():
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert _resolve_impl("distill", "auto", cpu, None, fp32) is linear_distill_chunked
    assert _resolve_impl("distill", "naive", cpu, None, fp32) is linear_distill_naive
    assert _resolve_impl("logprobs", "auto", cpu, None, torch.bfloat16).__name__ == "linear_logprobs_chunked"
    assert _resolve_impl("logprobs", "naive", cpu, None, fp32).__name__ == "linear_logprobs_naive"


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("alpha,topk", [(0.5, None), (1.0, 5)])
def test_chunked_never_allocates_tokens_by_vocab(alpha, topk):
    n, v, rows = 400, 301, 16
    hs, hh, w, wt, y = make_inputs(16, n=n, v=v)
    hs.requires_grad_(True)
    w.requires_grad_(True)
    with _MaxNumel() as probe:
        out = linear_distill_chunked(hs, hh, w, wt, y, alpha=alpha, temperature=1.0, topk=topk, add_tail=True,
                                     ignore_index=IGNORE, chunk_elems=rows * v)
        (out.divergence.sum() + out.student_logp.sum()).backward()
    assert probe.largest <= max(rows * v, n * H, v * H), probe.largest
    with _MaxNumel() as naive_probe:
        linear_distill_naive(hs, hh, w, wt, y, alpha=alpha, temperature=1.0, topk=topk, add_tail=True,
                             ignore_index=IGNORE)
    assert naive_probe.largest >= n * v  # the probe does see [N, V] when it exists


def _bad_calls():
    hs, hh, w, wt, y = make_inputs(17)
    good = dict(student_hidden=hs, teacher_hidden=hh, weight=w, targets=y)
    yield "weight", dict(good, weight=w[None])
    yield "student_hidden", dict(good, student_hidden=hs[:, :-1])
    yield "teacher_hidden", dict(good, teacher_hidden=hh[:-1])
    yield "targets", dict(good, targets=y[:-1])
    yield "targets", dict(good, targets=y.float())
    yield "targets", dict(good, targets=torch.where(y == IGNORE, IGNORE, V))
    yield "targets", dict(good, targets=torch.where(y == IGNORE, -1, y))
    yield "teacher_weight", dict(good, teacher_weight=wt[:-1])
    yield "student_hidden", dict(good, student_hidden=hs.int())
    yield "dtype", dict(good, student_hidden=hs.double())
    yield "alpha", dict(good, alpha=1.5)
    yield "alpha", dict(good, alpha=-0.1)
    yield "temperature", dict(good, temperature=0.0)
    yield "temperature", dict(good, temperature=float("nan"))
    yield "topk", dict(good, topk=0)
    yield "topk", dict(good, topk=V + 1)
    yield "topk", dict(good, topk=2.5)
    yield "impl", dict(good, impl="fast")
    yield "adv_clip", dict(good, adv_clip=0.0)
    yield "adv_clip", dict(good, adv_clip=float("inf"))
    yield "adv_clip", dict(good, adv_clip=1.0, alpha=0.5, topk=5)
    yield "adv_clip", dict(good, adv_clip=1.0, alpha=1.0, topk=None)
    yield "device", dict(good, weight=w.to("meta"))


@pytest.mark.parametrize("name,kwargs", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_value_error_naming_the_argument(name, kwargs):
    with pytest.raises(ValueError, match=name):
        linear_distill(**kwargs)


@pytest.mark.parametrize("add_tail", [True, False])
def test_adv_clip_is_the_clipped_policy_gradient(add_tail):
    """float64, written independently: reverse KL on the student's top-k, each support token's advantage
    log q - log p clamped to [-c, c] in -sum_j p_j A_j grad log p_j; value sum_j p_j clamp(log p - log q)."""
    hs, hh, w, wt, y = make_inputs(21, dtype=torch.float64, ignore_every=0)
    topk, clip, temperature = 6, 0.4, 0.8
    kw = dict(alpha=1.0, temperature=temperature, topk=topk, add_tail=add_tail, adv_clip=clip)
    hs_ref, w_ref = hs.clone().requires_grad_(), w.clone().requires_grad_()
    logp_s = ((hs_ref @ w_ref.T) / temperature).log_softmax(-1)
    logp_t = ((hh @ wt.T) / temperature).log_softmax(-1)
    support = logp_s.detach().topk(topk, dim=-1).indices
    s, t = logp_s.gather(-1, support), logp_t.gather(-1, support)
    if add_tail:
        s = torch.cat([s, torch.log1p(-s.exp().sum(-1, keepdim=True))], -1)
        t = torch.cat([t, torch.log1p(-t.exp().sum(-1, keepdim=True))], -1)
    else:
        s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    advantage = (t - s).detach().clamp(-clip, clip)
    assert ((t - s).abs() > clip).float().mean() > 0.3  # the clip is active on many support tokens
    g_div = upstream(21)[0]
    surrogate = -(g_div[:, None] * s.exp().detach() * advantage * s).sum()
    want_h, want_w = torch.autograd.grad(surrogate, (hs_ref, w_ref))
    want_value = (s.exp() * (s - t).clamp(-clip, clip)).sum(-1).detach()

    for impl in ("naive", "chunked"):
        out, got_h, got_w = run(linear_distill, hs, hh, w, wt, y, (g_div, torch.zeros_like(g_div)), impl=impl, **kw)
        assert max_abs(out.divergence, want_value) < 1e-12, impl
        assert rel_err(got_h, want_h) < 1e-12 and rel_err(got_w, want_w) < 1e-12, impl
    unclipped = run(linear_distill, hs, hh, w, wt, y, (g_div, torch.zeros_like(g_div)), impl="naive",
                    **{**kw, "adv_clip": None})
    assert rel_err(unclipped[1], want_h) > 0.05  # clipping changed the gradient


@pytest.mark.parametrize("add_tail", [True, False])
def test_chunked_adv_clip_matches_float64_reference(add_tail):
    inputs = make_inputs(23)
    kw = dict(alpha=1.0, temperature=0.7, topk=5, add_tail=add_tail, adv_clip=0.5)
    grads = upstream(23)
    got = run(lambda *a, **k: linear_distill_chunked_multi(*a, **k), *inputs, grads, **kw)
    assert_close_to_reference(got, reference(*inputs, grads, **kw))
    huge = run(lambda *a, **k: linear_distill_chunked_multi(*a, **k), *inputs, grads, **{**kw, "adv_clip": 1e6})
    assert_close_to_reference(huge, reference(*inputs, grads, **{**kw, "adv_clip": None}))
