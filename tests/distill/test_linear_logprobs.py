"""linear_logprobs (naive, chunked, triton) against a float64 reference: values, gradients, ignored rows,
temperature, no teacher work, errors, torch.compile tracing.

The triton cases run on a CUDA GPU, or on CPU in the Triton interpreter (TRITON_INTERPRET=1 set before
the session starts); they skip otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdpo_fast import LogProbOutput, linear_distill, linear_logprobs
from sdpo_fast.distill.chunked import linear_logprobs_chunked
from tests.conftest import IGNORE, op_inputs

N, H, V = 37, 24, 101  # non-powers of two


def make_inputs(seed, *, n=N, h=H, v=V, ignore_every=4, dtype=torch.float64, **kw):
    """(hidden [*lead, n, h], head [v, h], targets) of the shared builder, hidden states of scale 2."""
    x = op_inputs(seed, n=n, h=h, v=v, hidden_scale=2.0, ignore_every=ignore_every, dtype=dtype,
                  separate_head=False, **kw)
    return x.hidden, x.weight, x.targets


def spec(hidden, weight, targets, temperature):
    """An independent float64 definition: cross-entropy and Categorical entropy, zeros on ignored rows."""
    logits = (hidden.double() @ weight.double().T) / temperature
    valid = targets != IGNORE
    logp = -F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    return logp.reshape(targets.shape), torch.where(valid, entropy, 0.0)


def with_grads(fn, hidden, weight, targets, upstream, **kw):
    """(logp, entropy, d hidden, d weight) of sum(upstream * logp)."""
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    logp, entropy = fn(hidden, weight, targets, **kw)
    grad_h, grad_w = torch.autograd.grad((logp * upstream.to(logp.dtype)).sum(), (hidden, weight))
    return logp.detach(), entropy.detach(), grad_h, grad_w


def reference(hidden, weight, targets, upstream, temperature):
    return with_grads(lambda h, w, y: spec(h, w, y, temperature), hidden.double(), weight.double(), targets,
                      upstream)


def assert_matches(got, want, *, atol, rtol, baseline=None):
    """Every field close to the reference; with a `baseline` (plain-torch results in the same dtype), the
    error may also reach twice the baseline's worst error (float32 cannot do better than that)."""
    for i, (name, g, w) in enumerate(zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, want)):
        slack = 0.0 if baseline is None else 2 * float((baseline[i].double() - w).abs().max())
        torch.testing.assert_close(g.double(), w, atol=atol + slack, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_naive_float64_is_the_specification():
    hidden, weight, targets = make_inputs(0, lead=(3,))
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    for temperature in (1.0, 0.6):
        got = with_grads(linear_logprobs, hidden, weight, targets, upstream, temperature=temperature, impl="naive")
        assert_matches(got, reference(hidden, weight, targets, upstream, temperature), atol=1e-10, rtol=1e-10)
    assert isinstance(linear_logprobs(hidden, weight, targets), LogProbOutput)


@pytest.mark.parametrize("temperature,offset", [(1.0, 0.0), (0.7, 0.0), (1.3, 200.0)])
def test_chunked_fp32_matches_float64_reference(temperature, offset):
    """Several chunks (5 rows each), leading batch dims, ignored rows, and logits sharing a large offset."""
    hidden, weight, targets = make_inputs(1, lead=(2,), offsets=(offset, offset))
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    want = reference(hidden, weight, targets, upstream, temperature)

    def chunked(h, w, y):
        out = linear_logprobs_chunked(h.flatten(0, 1), w, y.flatten(), temperature=temperature, ignore_index=IGNORE,
                                      chunk_elems=5 * V + 3)
        return out.reshape(*y.shape)

    baseline = with_grads(linear_logprobs, hidden.float(), weight.float(), targets, upstream,
                          temperature=temperature, impl="naive")
    got = with_grads(chunked, hidden.float(), weight.float(), targets, upstream)
    assert_matches(got, want, atol=2e-4, rtol=1e-4, baseline=baseline)
    auto = with_grads(linear_logprobs, hidden.float(), weight.float(), targets, upstream, temperature=temperature)
    assert_matches(auto, want, atol=2e-4, rtol=1e-4, baseline=baseline)
    ignored = targets == IGNORE
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()


def test_chunked_float64_gradcheck():
    hidden, weight, targets = make_inputs(2, n=9, h=5, v=13, ignore_every=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def f(h, w):
        out = linear_logprobs(h, w, targets, temperature=0.8, impl="chunked")
        return out.logp

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_agrees_with_linear_distill_student_outputs():
    hidden, weight, targets = make_inputs(3)
    teacher = torch.randn_like(hidden)
    distill = linear_distill(hidden, teacher, weight, targets, temperature=0.9, alpha=1.0)
    out = linear_logprobs(hidden.requires_grad_(True), weight, targets, temperature=0.9)
    assert out.logp.requires_grad and not out.entropy.requires_grad
    torch.testing.assert_close(out.logp, distill.student_logp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, distill.entropy, atol=1e-12, rtol=1e-12)


def _profile(fn) -> tuple[int, int]:
    """(matrix products run, largest single allocation in bytes) while `fn()` runs, nested ops included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    gemms = sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_") for e in events)
    return gemms, max(e.self_cpu_memory_usage for e in events)


def test_chunked_does_no_teacher_work_and_never_allocates_tokens_by_vocab():
    """Forward: one GEMM per chunk (no teacher GEMM); backward: one recompute + two GEMMs per chunk."""
    n, v, rows = 400, 301, 16
    hidden, weight, targets = make_inputs(4, n=n, v=v, ignore_every=0)
    hidden, weight = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    chunks = -(-n // rows)
    outs = []
    forward = _profile(lambda: outs.append(linear_logprobs_chunked(
        hidden, weight, targets, temperature=1.0, ignore_index=IGNORE, chunk_elems=rows * v)))
    backward = _profile(lambda: outs[0].logp.sum().backward())
    assert forward[0] == chunks and backward[0] == 3 * chunks, (forward, backward)
    assert max(forward[1], backward[1]) <= 4 * max(rows * v, n * H, v * H) < 4 * n * v


def _bad_calls():
    hidden, weight, targets = make_inputs(5)
    good = dict(hidden=hidden, weight=weight, targets=targets)
    yield "hidden", dict(good, hidden=hidden.tolist())
    yield "weight", dict(good, weight=weight[None])
    yield "hidden", dict(good, hidden=hidden[:, :-1])
    yield "targets", dict(good, targets=targets[:-1])
    yield "targets", dict(good, targets=targets.float())
    yield "targets", dict(good, targets=torch.where(targets == IGNORE, IGNORE, V))
    yield "hidden", dict(good, hidden=hidden.int())
    yield "dtype", dict(good, hidden=hidden.float())
    yield "temperature", dict(good, temperature=0.0)
    yield "temperature", dict(good, temperature=float("inf"))
    yield "ignore_index", dict(good, ignore_index=1.5)
    yield "impl", dict(good, impl="fast")
    yield "device", dict(good, weight=weight.to("meta"))


@pytest.mark.parametrize("name,kwargs", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_value_error_naming_the_argument(name, kwargs):
    with pytest.raises(ValueError, match=name):
        linear_logprobs(**kwargs)


def test_compiled_caller_traces_in_one_graph_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def grpo_like(hidden, weight, targets, advantages):
        out = linear_logprobs(hidden, weight, targets, temperature=0.9)
        return -(advantages * out.logp).sum() + out.entropy.sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(grpo_like, fullgraph=True, dynamic=True, backend=counter)
    try:
        frames = []
        for seed, n in ((6, 20), (7, 31)):  # neither equals H (duck sizing would tie them)
            hidden, weight, targets = make_inputs(seed, n=n, dtype=torch.float32)
            adv = torch.randn(n)
            results = []
            for fn in (compiled, grpo_like):
                h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
                loss = fn(h, w, targets, adv)
                loss.backward()
                results.append((loss.detach(), h.grad, w.grad))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want)
            frames.append(counter.frame_count)
        assert frames[0] == frames[1] == 1
    finally:
        torch._dynamo.reset()


def test_chunked_op_registration():
    hidden, weight, targets = make_inputs(8, n=12, v=41, dtype=torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.sdpo_fast.linear_logprobs_chunked.default,
                          (hidden, weight, targets, 0.8, IGNORE, 5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- impl="triton": GPU, or the Triton interpreter on CPU ---------------------------------------------------

def _triton_device() -> str | None:
    try:
        from sdpo_fast.kernels import INTERPRET
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if INTERPRET else None


@pytest.mark.skipif(_triton_device() is None,
                    reason="needs the triton package and a CUDA GPU, or TRITON_INTERPRET=1 for the interpreter")
@pytest.mark.parametrize("temperature,splits", [(1.0, None), (0.7, 3)])
def test_triton_matches_float64_reference(temperature, splits):
    """Several row, vocabulary (V = 1000: 4 tiles of 256 in the interpreter) and hidden tiles, vocabulary
    splits merged, ignored rows; the backward runs in vocabulary chunks (workspace of 256 columns)."""
    from threadpoolctl import threadpool_limits

    from sdpo_fast.distill.triton_impl import linear_logprobs_triton

    device = _triton_device()
    hidden, weight, targets = make_inputs(9, n=70, h=72, v=1000, ignore_every=5)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    want = reference(hidden, weight, targets, upstream, temperature)
    hidden, weight, targets = hidden.float().to(device), weight.float().to(device), targets.to(device)
    with threadpool_limits(limits=1, user_api="blas"):  # numpy's pool fights torch's on small CPUs
        got = with_grads(linear_logprobs_triton, hidden, weight, targets, upstream.to(device),
                         temperature=temperature, ignore_index=IGNORE, splits=splits, workspace_bytes=70 * 256 * 4)
    assert_matches([t.cpu() for t in got], want, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="splits"):
        linear_logprobs_triton(hidden, weight, targets, temperature=1.0, ignore_index=IGNORE, splits=0)
