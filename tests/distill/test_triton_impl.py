"""impl="triton": the fused kernels against the float64 specification (naive), forward and backward.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before the test session
starts); on a CUDA machine they run on the GPU. Shapes stay small (N <= 256, H <= 128, V <= 4096) with
a non-power-of-two vocabulary, so every kernel sees several row, vocabulary and hidden tiles and
masked tails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="needs the triton package")

from sdpo_fast import linear_distill  # noqa: E402
from sdpo_fast.distill import api, triton_impl  # noqa: E402
from sdpo_fast.distill.triton_impl import linear_distill_triton  # noqa: E402
from sdpo_fast.kernels import INTERPRET  # noqa: E402
from tests.conftest import IGNORE, op_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="needs a CUDA GPU, or TRITON_INTERPRET=1 for the Triton interpreter"
)
FIELDS = ("divergence", "student_logp", "teacher_logp", "advantage", "entropy")


def _interpreter_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
    """Replacement for the interpreter's `tl.dot`: bf16 operands (stored as uint16 bit patterns, which
    the interpreter multiplies as integers) are widened to fp32 exactly, and the product goes through
    BLAS. The kernels' GPU path is untouched."""
    from triton.runtime.interpreter import TensorHandle

    def as_fp32(x):
        if x.dtype.scalar == triton.language.bfloat16:
            return (x.data.astype(np.uint32) << 16).view(np.float32)
        return x.data.astype(np.float32)

    return TensorHandle(np.matmul(as_fp32(a), as_fp32(b)) + acc.data, acc.dtype.scalar)


@pytest.fixture(scope="module", autouse=True)
def _interpreter_harness():
    """Under the interpreter: a working bf16 `tl.dot`, and single-threaded BLAS (numpy's thread pool
    fighting torch's on two cores makes the interpreter several times slower)."""
    if not INTERPRET:
        yield
        return
    from threadpoolctl import threadpool_limits
    from triton.runtime.interpreter import InterpreterBuilder

    with pytest.MonkeyPatch.context() as mp, threadpool_limits(limits=1, user_api="blas"):
        mp.setattr(InterpreterBuilder, "create_dot", _interpreter_dot)
        yield


def make_case(n=100, h=72, v=1001, *, h_t=40, ignored=0.15, offsets=(0.0, 0.0), peaked=False,
              dtype=torch.float32, seed=0):
    """Inputs of the shared builder on DEVICE, and upstream gradients [2, n] (divergence, student_logp).

    `offsets` adds a constant to every student / teacher logit (through a hidden unit fixed at 1);
    `peaked` scales the heads so one token takes almost all the mass; h_t=None shares the student head.
    """
    case = op_inputs(seed, n=n, h=h, v=v, teacher_h=h_t, separate_head=h_t is not None,
                     head_scale=12.0 if peaked else 1.2, offsets=offsets, ignore_frac=ignored, dtype=dtype)
    upstream = torch.randn(2, n, generator=torch.Generator().manual_seed(seed + 1000))
    return (*case.to(DEVICE), upstream.to(DEVICE))


def run(impl, hs, ht, weight, teacher_weight, targets, upstream, *, dtype=None, use=(True, True), **kwargs):
    """Outputs and gradients (student hidden, weight) of `impl` on copies of the inputs cast to `dtype`.

    The loss sums the upstream gradients times divergence and student_logp (`use` picks which).
    """
    cast = lambda t: None if t is None else t.detach().to(dtype or t.dtype).clone()  # noqa: E731
    hs, ht, weight, teacher_weight = map(cast, (hs, ht, weight, teacher_weight))
    for t in (hs, ht, weight, teacher_weight):
        if t is not None:
            t.requires_grad_(True)
    if impl == "triton-direct":  # the implementation function itself, for its extra knobs
        out = linear_distill_triton(hs, ht, weight, weight if teacher_weight is None else teacher_weight,
                                    targets, topk=None, add_tail=True, ignore_index=IGNORE, **kwargs)
    else:
        out = linear_distill(hs, ht, weight, targets, teacher_weight=teacher_weight, impl=impl,
                             ignore_index=IGNORE, **kwargs)
    terms = [g.to(o.dtype) * o for g, o, u in zip(upstream, out[:2], use) if u]
    sum(t.sum() for t in terms).backward()
    if teacher_weight is not None:
        assert teacher_weight.grad is None, "the teacher head must get no gradient"
    assert ht.grad is None, "teacher_hidden must get no gradient"
    return out, hs.grad, weight.grad


def assert_close_to_reference(case, *, atol=1e-4, rtol=1e-4, grad_atol=1e-4, use=(True, True), knobs=None,
                              **kwargs):
    """Triton in fp32 against naive in fp64; ignored rows exactly zero with zero gradients.

    `knobs` (splits, workspace_bytes) go to the implementation function directly.
    """
    if knobs:
        out, grad_h, grad_w = run("triton-direct", *case, use=use, **knobs, **kwargs)
    else:
        out, grad_h, grad_w = run("triton", *case, use=use, **kwargs)
    ref, ref_h, ref_w = run("naive", *case, dtype=torch.float64, use=use, **kwargs)
    targets = case[4]
    ignored = targets == IGNORE
    for name, got, want in zip(FIELDS, out, ref):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert (got[ignored] == 0).all(), name
    for name, got, want in (("d student_hidden", grad_h, ref_h), ("d weight", grad_w, ref_w)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=grad_atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert (grad_h[ignored] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_matches_float64_reference(alpha):
    """All divergences, temperature, a separate teacher head of another width, ignored rows."""
    assert_close_to_reference(make_case(seed=1), alpha=alpha, temperature=0.7)


def test_shared_head_gets_student_gradient_only():
    """teacher_weight=None: one tensor is both heads; only the student side sends it gradient."""
    assert_close_to_reference(make_case(n=64, h_t=None, seed=2), alpha=0.5, temperature=1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_extreme_logits(alpha):
    """Large, different logit offsets (+50 student, -30 teacher) and peaked distributions.

    fp32 logits near 50 carry rounding of ulp(50) ~ 4e-6. The offset's hidden unit gets the gradient
    50 * sum_v G, zero in exact arithmetic, so its rounding is 50x larger: about 50 * 4e-6 per unit of
    upstream gradient (|upstream| < 5 here), which bounds the hidden-state gradient's tolerance.
    """
    case = make_case(n=64, offsets=(50.0, -30.0), peaked=True, seed=3)
    assert_close_to_reference(case, alpha=alpha, temperature=1.0, atol=2e-4, rtol=2e-4, grad_atol=50 * 4e-6 * 5)


def test_all_rows_ignored():
    hs, ht, w, wt, targets, upstream = make_case(n=16, seed=4)
    targets[:] = IGNORE
    out, grad_h, grad_w = run("triton", hs, ht, w, wt, targets, upstream, alpha=0.5)
    assert all((t == 0).all() for t in out)
    assert (grad_h == 0).all() and (grad_w == 0).all()


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["divergence-only", "logp-only"])
def test_one_upstream_gradient(use):
    """Backward with a gradient on one output only (the other is unused: None upstream); no ignored rows."""
    assert_close_to_reference(make_case(n=64, ignored=0.0, seed=5), alpha=0.5, temperature=1.3, use=use)


@pytest.mark.parametrize("splits", [1, 3, 64])
def test_vocabulary_splits_and_backward_chunks(splits):
    """Any number of vocabulary splits merges to the same result (64 > tiles leaves splits empty), and
    a small workspace makes backward walk several vocabulary chunks (the last one partial)."""
    case = make_case(n=48, seed=6)
    knobs = {"splits": splits, "workspace_bytes": 48 * 384 * 4}  # 384 columns per chunk: 1001 = 2 x 384 + 233
    assert_close_to_reference(case, knobs=knobs, alpha=0.3, temperature=0.9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_no_worse_than_torch(dtype):
    """bf16/fp16 inputs: error vs float64 within the plain-torch baseline's error (same dtype) plus a
    tolerance of 2% of the largest reference value."""
    case = make_case(n=64, v=777, h=96, dtype=dtype, seed=7)
    out, grad_h, grad_w = run("triton", *case, alpha=0.5, temperature=1.0)
    base, base_h, base_w = run("naive", *case, alpha=0.5, temperature=1.0)
    ref, ref_h, ref_w = run("naive", *case, dtype=torch.float64, alpha=0.5, temperature=1.0)
    pairs = [*zip(FIELDS, out, base, ref), ("d student_hidden", grad_h, base_h, ref_h),
             ("d weight", grad_w, base_w, ref_w)]
    for name, got, baseline, want in pairs:
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        base_err = (baseline.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= base_err + 2e-2 * scale + 1e-3, f"{name}: error {err:.3g} vs torch baseline {base_err:.3g}"


def test_rejects_unsupported_inputs(monkeypatch):
    hs, ht, w, wt, targets, _ = make_case(n=8, v=300, seed=8)
    with pytest.raises(ValueError, match="topk"):
        linear_distill(hs, ht, w, targets, teacher_weight=wt, impl="triton", topk=5)
    with pytest.raises(ValueError, match="float64"):
        linear_distill(hs.double(), ht.double(), w.double(), targets, teacher_weight=wt.double(), impl="triton")
    bad = targets.clone()
    bad[2] = 300
    with pytest.raises(ValueError, match="targets"):
        linear_distill(hs, ht, w, bad, teacher_weight=wt, impl="triton")
    monkeypatch.setattr(api, "_triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton package"):
        linear_distill(hs, ht, w, targets, teacher_weight=wt, impl="triton")
    assert api._resolve_impl("distill", "auto", hs.device, None, hs.dtype).__name__ == "linear_distill_chunked"


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_is_an_error(monkeypatch):
    hs, ht, w, wt, targets, _ = make_case(n=8, v=300, seed=9)
    monkeypatch.setattr(triton_impl, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        linear_distill(hs, ht, w, targets, teacher_weight=wt, impl="triton")


def test_auto_picks_triton_for_half_precision_on_cuda_only():
    """impl="auto": the kernels for fp16/bf16 CUDA inputs; fp32, float64, top-k and CPU go to chunked."""
    device = torch.device(DEVICE)
    want = "linear_distill_triton" if DEVICE == "cuda" else "linear_distill_chunked"
    for dtype in (torch.bfloat16, torch.float16):
        assert api._resolve_impl("distill", "auto", device, None, dtype).__name__ == want
    assert api._resolve_impl("distill", "auto", device, 3, torch.bfloat16).__name__ == "linear_distill_chunked"
    for dtype in (torch.float32, torch.float64):
        assert api._resolve_impl("distill", "auto", device, None, dtype).__name__ == "linear_distill_chunked"


def test_custom_op_registration():
    """torch.library's own consistency checks: schema, fake tensors, autograd registration."""
    hs, ht, w, wt, targets, _ = make_case(n=24, v=300, h=40, seed=10)
    hs.requires_grad_(True)
    w.requires_grad_(True)
    args = (hs, ht, w, wt, targets, 0.5, 1.0, IGNORE, None, 1 << 20)
    torch.library.opcheck(torch.ops.sdpo_fast.linear_distill_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fully_ignored_row_tile():
    """A whole row tile of ignored rows (the kernels skip its vocabulary walk and GEMMs) next to tiles
    with valid rows."""
    case = make_case(n=150, ignored=0.1, seed=11)
    case[4][:64] = IGNORE
    assert_close_to_reference(case, alpha=0.5, temperature=1.0)


# aten ops that copy a device value to the host (a synchronisation, and a break of CUDA-graph capture).
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2",
             "unique_consecutive", "repeat_interleave")


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op dispatched while active, and any indexing by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.names.append(name)
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype == torch.bool for t in indices):
                self.names.append("bool-mask indexing")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward_and_backward():
    """The op's forward and backward implementations (run directly, so the recorder sees inside them)
    dispatch no op that reads a device value on the host: no .item(), nonzero or boolean-mask indexing,
    with ignored rows present."""
    hs, ht, w, wt, targets, upstream = make_case(n=48, seed=12)
    args = (0.5, 1.0, IGNORE, None, 1 << 20)
    with _OpRecorder() as rec:
        div, logp, _, saved = triton_impl._triton_forward._init_fn(hs, ht, w, wt, targets, *args)
        grad_h, grad_w = triton_impl._triton_backward._init_fn(upstream[0], upstream[1], hs, ht, w, wt, targets,
                                                               saved, *args, True, True)
        triton_impl._triton_logprobs_backward._init_fn(upstream[1], hs, w, targets, saved[:1], 1.0, IGNORE,
                                                       None, 1 << 20, True, True)
    assert rec.names, "the recorder saw no op"
    found = sorted({n for n in rec.names if n in _SYNC_OPS or n == "bool-mask indexing"})
    assert not found, f"host-synchronising ops: {found}"
    assert torch.isfinite(div).all() and torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()


def test_recorder_catches_the_row_selection_it_guards_against():
    """The recorder of the test above does see a nonzero() row selection and a boolean-mask index."""
    targets = torch.tensor([1, IGNORE, 2])
    with _OpRecorder() as rec:
        rows = (targets != IGNORE).nonzero().squeeze(-1)
        _ = targets[targets != IGNORE]
    assert "nonzero" in rec.names and "bool-mask indexing" in rec.names and rows.numel() == 2


def test_grad_hidden_accumulates_in_fp32():
    """d(h_s) += G W over chunks stays fp32: bf16 G and W, three chunks, against float64 to fp32-level
    accuracy (rounding each chunk's product to bf16 would be off by ~2^-9 of its size)."""
    from sdpo_fast.kernels.distill_backward import grad_hidden_launch

    gen = torch.Generator().manual_seed(13)
    g = torch.randn(70, 3 * 96, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(3 * 96, 40, generator=gen).to(DEVICE, torch.bfloat16)
    dh = torch.randn(70, 40, generator=gen).to(DEVICE) * 100.0
    want = dh.double() + g.double() @ w.double()
    for c in range(3):
        grad_hidden_launch(g[:, c * 96:(c + 1) * 96], w[c * 96:(c + 1) * 96], dh)()
    err = (dh.double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU to capture a CUDA graph")
def test_cuda_graph_capture():
    """Forward and backward of the public fused op (argument checks included) captured in one CUDA graph
    (possible only without host syncs) and replayed on new inputs give the eager results."""
    hs, ht, w, wt, targets, upstream = make_case(n=200, h=128, v=3000, h_t=64, dtype=torch.bfloat16, seed=14)
    hs.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        out = linear_distill(hs, ht, w, targets, teacher_weight=wt, alpha=0.5, temperature=1.0,
                             ignore_index=IGNORE, impl="triton")  # the public op, its checks included
        loss = (upstream[0] * out.divergence + upstream[1] * out.student_logp).sum()
        return torch.autograd.grad(loss, (hs, w))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernel compilation happens outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    fresh = make_case(n=200, h=128, v=3000, h_t=64, dtype=torch.bfloat16, seed=15)
    with torch.no_grad():
        for dst, src in zip((hs, ht, w, wt, targets, upstream), fresh):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static_grads, step()):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)
