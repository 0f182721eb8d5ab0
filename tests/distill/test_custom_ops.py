"""torch.compile traces callers of `linear_distill` in one graph (the implementations are custom ops).

On CPU, impl="auto" runs the chunked implementation inside its op.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from sdpo_fast import linear_distill
from tests.conftest import IGNORE, op_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs(n=24, h=16, v=97, seed=0):
    """float32 (hidden, teacher hidden, shared head, targets) of the shared builder, every fifth row ignored;
    the student's hidden states and head require gradients."""
    x = op_inputs(seed, n=n, h=h, v=v, separate_head=False, head_scale=2.0, ignore_every=5, dtype=torch.float32)
    return x.hidden.requires_grad_(True), x.teacher_hidden, x.weight.requires_grad_(True), x.targets


def sdpo_loss(hs, ht, weight, targets):
    """A small caller: logit-level distillation plus a sampled-token term, token-mean over valid rows."""
    out = linear_distill(hs, ht, weight, targets, alpha=0.5, temperature=0.9, ignore_index=IGNORE)
    valid = (targets != IGNORE).sum().clamp(min=1)
    return (out.divergence - out.advantage * out.student_logp).sum() / valid


def loss_and_grads(fn, hs, ht, weight, targets):
    hs, weight = hs.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss = fn(hs, ht, weight, targets)
    loss.backward()
    return loss.detach(), hs.grad, weight.grad


def test_inductor_compiles_caller_in_one_graph():
    inputs = make_inputs()
    compiled = torch.compile(sdpo_loss, fullgraph=True, backend="inductor")
    for got, want in zip(loss_and_grads(compiled, *inputs), loss_and_grads(sdpo_loss, *inputs)):
        torch.testing.assert_close(got, want)


def test_compiled_caller_with_dynamic_shapes_and_topk():
    """New row counts and ignore patterns reuse the graph; the op's data-dependent row selection and
    top-k support stay inside it."""

    def topk_loss(hs, ht, weight, targets):
        out = linear_distill(hs, ht, weight, targets, alpha=1.0, topk=7, ignore_index=IGNORE)
        return out.divergence.sum() + out.entropy.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(topk_loss, fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for n, seed in ((24, 1), (31, 2)):
        inputs = make_inputs(n=n, seed=seed)
        for got, want in zip(loss_and_grads(compiled, *inputs), loss_and_grads(topk_loss, *inputs)):
            torch.testing.assert_close(got, want)
        compiles.append(counter.frame_count)
    assert compiles[0] == compiles[1], "a new row count must not recompile"


def test_compiled_caller_still_checks_target_range():
    hs, ht, weight, targets = make_inputs()
    targets[3] = weight.shape[0]  # one past the vocabulary
    compiled = torch.compile(sdpo_loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="targets must be token ids"):
        compiled(hs, ht, weight, targets)


def test_chunked_op_registration():
    """torch.library's consistency checks of the chunked op: schema, fake tensors, autograd."""
    hs, ht, weight, targets = make_inputs(n=12, v=41)
    for alpha, adv_clip in ((0.5, None), (1.0, 2.0)):
        args = (hs, ht, weight, weight.detach(), targets, alpha, 1.0, 5, True, IGNORE, 16, adv_clip)
        torch.library.opcheck(torch.ops.sdpo_fast.linear_distill_chunked.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
