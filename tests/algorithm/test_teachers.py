"""Teacher modes: trust-region equivalence, EMA update (plain and FSDP2-sharded), mode plumbing."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from sdpo_fast.algorithm.aggregation import Aggregator
from sdpo_fast.algorithm.teachers import Teacher, ema_update, lm_head_weight
from sdpo_fast.distill import linear_distill
from sdpo_fast.distill.formulas import divergence, topk_support
from tests.conftest import FORK_ONLY, IGNORE, run_two_ranks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def _head(vocab: int, hidden: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(hidden, vocab, bias=False).double()


@pytest.mark.parametrize("alpha, topk", [(0.0, None), (0.5, None), (1.0, None), (0.5, 5)])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_trust_region_equals_lerp_of_materialised_logits(alpha, topk, impl):
    n, hidden, vocab, tau, temperature = 13, 6, 37, 0.3, 0.7
    student = _head(vocab, hidden, seed=0)
    teacher = Teacher("trust_region", student, tau=tau)
    with torch.no_grad():  # the student has moved away from the initial (reference) weights
        student.weight.add_(0.5 * torch.randn_like(student.weight))
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(n, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    h_ref = torch.randn(n, hidden, dtype=torch.float64, generator=g)
    h_cur = torch.randn(n, hidden, dtype=torch.float64, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[3] = IGNORE
    w_ref, w_cur = teacher.model.weight, student.weight

    out = linear_distill(h_s, teacher.teacher_hidden([h_ref, h_cur]), w_cur, y,
                         teacher_weight=teacher.teacher_head([w_ref, w_cur]), alpha=alpha,
                         temperature=temperature, topk=topk, impl=impl)
    grad = torch.autograd.grad(out.divergence.sum() + out.student_logp.sum(), [h_s, w_cur])

    # materialised reference: teacher logits = lerp(initial-model logits, current-model logits, tau)
    logits_t = torch.lerp(h_ref @ w_ref.T, h_cur @ w_cur.T, tau).detach() / temperature
    logits_s = h_s @ w_cur.T / temperature
    logp_s, logp_t = logits_s.log_softmax(-1), logits_t.log_softmax(-1)
    if topk is None:
        div = divergence(logp_s, logp_t, alpha)
    else:
        support = logits_s.detach().topk(topk, -1).indices
        div = divergence(*topk_support(logp_s.gather(-1, support), logp_t.gather(-1, support), True), alpha)
    valid = y != IGNORE
    yy = y.clamp(min=0).unsqueeze(-1)
    ref_div = torch.where(valid, div, 0.0)
    ref_slp = torch.where(valid, logp_s.gather(-1, yy).squeeze(-1), 0.0)
    ref_tlp = torch.where(valid, logp_t.gather(-1, yy).squeeze(-1), 0.0)
    ref_grad = torch.autograd.grad(ref_div.sum() + ref_slp.sum(), [h_s, w_cur])

    torch.testing.assert_close(out.divergence, ref_div, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.teacher_logp, ref_tlp, rtol=1e-10, atol=1e-12)
    for got, want in zip(grad, ref_grad):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_mode_plumbing():
    student = _head(11, 4, seed=0)
    w_s = student.weight
    h = torch.randn(3, 4, dtype=torch.float64)

    live = Teacher("live", student)
    assert live.model is None and live.scoring_models == (student,)
    assert live.teacher_head([w_s]) is None
    assert torch.equal(live.teacher_hidden([h]), h) and not live.teacher_hidden([h.requires_grad_()]).requires_grad

    for mode in ("ema", "frozen"):
        t = Teacher(mode, student, tau=0.1)
        assert t.scoring_models == (t.model,) and t.model is not student
        assert not any(p.requires_grad for p in t.model.parameters())
        assert torch.equal(t.teacher_head([t.model.weight]), t.model.weight)

    tr = Teacher("trust_region", student, tau=0.25)
    assert tr.scoring_models == (tr.model, student)
    head = tr.teacher_head([tr.model.weight, w_s])
    assert head.shape == (11, 8) and not head.requires_grad
    torch.testing.assert_close(tr.teacher_hidden([h, 2 * h]), torch.cat([0.75 * h, 0.5 * h], -1))

    with pytest.raises(ValueError, match="mode"):
        Teacher("average", student)
    with pytest.raises(ValueError, match="tau"):
        Teacher("ema", student, tau=1.5)
    with pytest.raises(ValueError, match="live"):
        Teacher("live", student, model=copy.deepcopy(student))
    with pytest.raises(ValueError, match="own weights"):
        Teacher("ema", student, model=student)
    with pytest.raises(ValueError, match="2 tensors"):
        tr.teacher_hidden([h])


def test_lm_head_weight_of_a_causal_lm():
    from sdpo_fast.models import tiny_random_model

    model = tiny_random_model(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    assert lm_head_weight(model) is model.get_input_embeddings().weight  # tied
    assert lm_head_weight(model).shape == (97, 16)
    model.lm_head.bias = nn.Parameter(torch.zeros(97))  # the fused ops compute hidden @ weight^T only
    with pytest.raises(ValueError, match="has a bias"):
        lm_head_weight(model)


def test_ema_update_and_frozen_teacher_after_step():
    student = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ema = Teacher("ema", student, tau=0.05)
    frozen = Teacher("frozen", student)
    before_ema = [p.clone() for p in ema.model.parameters()]
    before_frozen = [p.clone() for p in frozen.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema.after_step()
    frozen.after_step()
    for t, s, b in zip(ema.model.parameters(), student.parameters(), before_ema):
        torch.testing.assert_close(t, 0.95 * b + 0.05 * s, rtol=1e-6, atol=1e-7)
    for t, b in zip(frozen.model.parameters(), before_frozen):
        assert torch.equal(t, b)


def test_ema_update_casts_student_to_teacher_dtype_and_checks_structure():
    student = nn.Linear(4, 3).to(torch.bfloat16)
    teacher = nn.Linear(4, 3).double()
    expected = [torch.lerp(t.detach(), s.detach().double(), 0.5) for t, s in zip(teacher.parameters(),
                                                                               student.parameters())]
    ema_update(teacher, student, 0.5)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t.detach(), e)
    with pytest.raises(ValueError, match="names"):
        ema_update(nn.Linear(4, 3, bias=False), student, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(4, 2), nn.Linear(4, 3), 0.5)


# ---- 2-rank FSDP2 (gloo, CPU) -------------------------------------------------------------------------

def _fsdp_worker(rank: int, mesh: DeviceMesh, tau: float) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)  # same weights on every rank; odd sizes so shards are uneven and padded
    student = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = [torch.lerp(t.detach(), s.detach(), tau) for t, s in zip(teacher.parameters(),
                                                                       student.parameters())]
    for model in (student, teacher):
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in teacher.parameters())
    student_before = [p.full_tensor() for p in student.parameters()]

    Teacher("ema", student, tau=tau, model=teacher).after_step()

    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t.full_tensor(), e, rtol=1e-6, atol=1e-7)
    for s, b in zip(student.parameters(), student_before):
        assert torch.equal(s.full_tensor(), b)

    # global normalisers: each rank holds half of the mini-batch
    mask = torch.ones(2, 4, dtype=torch.bool) if rank == 0 else torch.tensor([[1, 0, 0, 0, 0, 0]]).bool()
    agg = Aggregator.for_batch(mask, "seq-mean-token-sum-norm", process_group=dist.group.WORLD)
    assert (agg.num_tokens, agg.num_seqs, agg.norm_length, agg.scale) == (9.0, 3.0, 6.0, 2.0)


@FORK_ONLY
def test_ema_update_on_fsdp2_sharded_parameters_equals_unsharded_update():
    run_two_ranks(_fsdp_worker, 0.05)
