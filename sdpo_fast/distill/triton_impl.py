"""impl="triton": `linear_distill` and `linear_logprobs` on the fused Triton kernels of `sdpo_fast.kernels`.

Forward: one pass over vocabulary tiles (two for the JSD) gives every per-row output without [N, V]
logits (kernels/distill_forward.py). Backward: the gradient w.r.t. the student logits is recomputed in
vocabulary chunks into a bounded workspace and applied with cuBLAS GEMMs (kernels/distill_backward.py).
Registered as a torch.library custom op (see `custom_ops`), so `torch.compile` traces its callers.
`linear_logprobs` runs the same kernels without their teacher tiles (no second GEMM, forward or backward).

Covers the full vocabulary (`topk=None`) for fp16/bf16/fp32 inputs (fp32 on 3xTF32 tensor-core products,
about fp32 accuracy; impl="auto" sends fp32 to impl="chunked"); `topk` and float64 raise ValueError
(impl="chunked" serves them, and impl="auto" routes them there). Ignored rows are masked inside the
kernels, so forward and backward make no host synchronisation (CUDA-graph capturable). Runs on CUDA tensors, or on CPU under
the Triton interpreter (TRITON_INTERPRET=1 set before import; slow, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from sdpo_fast.distill.custom_ops import (
    distill_output,
    fake_backward_outputs,
    fake_forward_outputs,
    fake_logprobs_outputs,
    logprobs_output,
    register_distill_autograd,
    register_logprobs_autograd,
)
from sdpo_fast.distill.output import DistillOutput, LogProbOutput
from sdpo_fast.kernels import INTERPRET
from sdpo_fast.kernels.distill_backward import DEFAULT_WORKSPACE_BYTES, distill_backward
from sdpo_fast.kernels.distill_forward import distill_forward, logprobs_forward

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("sdpo_fast::linear_distill_triton", mutates_args=())
def _triton_forward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int,
    splits: Optional[int],
    workspace_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward in the calling convention of `custom_ops`; saved = [3, N] (lse_s, lse_t, KL term).

    Every row goes through the kernels (ignored ones masked inside them): no host synchronisation.
    """
    st = distill_forward(student_hidden, teacher_hidden, weight, teacher_weight, targets, alpha=alpha,
                         temperature=temperature, ignore_index=ignore_index, splits=splits)
    detached = torch.stack([st.teacher_logp, st.teacher_logp - st.student_logp, st.entropy])
    saved = torch.stack([st.lse_student, st.lse_teacher, st.kl])
    # Outputs of a custom op may not alias each other (the kernels' outputs are views of one buffer).
    return st.divergence.clone(), st.student_logp.clone(), detached, saved


@_triton_forward.register_fake
def _(student_hidden, teacher_hidden, weight, teacher_weight, targets, alpha, temperature, ignore_index, splits,
      workspace_bytes):
    return fake_forward_outputs(student_hidden, targets)


@torch.library.custom_op("sdpo_fast::linear_distill_triton_backward", mutates_args=())
def _triton_backward(
    grad_div: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    saved: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int,
    splits: Optional[int],
    workspace_bytes: int,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward in the calling convention of `custom_ops`."""
    zeros = saved.new_zeros(targets.numel())
    row_stats = torch.stack([
        *saved,
        grad_div.float() if grad_div is not None else zeros,
        grad_logp.float() if grad_logp is not None else zeros,
    ])
    dh, dw = distill_backward(
        student_hidden, teacher_hidden, weight, teacher_weight, targets, row_stats, alpha=alpha,
        temperature=temperature, ignore_index=ignore_index, has_div=grad_div is not None,
        has_logp=grad_logp is not None, need_h=need_h, need_w=need_w, workspace_bytes=workspace_bytes,
    )
    return (dh.to(student_hidden.dtype) if need_h else student_hidden.new_empty(0),
            dw if need_w else weight.new_empty(0))


@_triton_backward.register_fake
def _(grad_div, grad_logp, student_hidden, teacher_hidden, weight, teacher_weight, targets, saved, alpha,
      temperature, ignore_index, splits, workspace_bytes, need_h, need_w):
    return fake_backward_outputs(student_hidden, weight, need_h, need_w)


register_distill_autograd(_triton_forward, _triton_backward)


def linear_distill_triton(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    topk: int | None,
    add_tail: bool,
    ignore_index: int,
    adv_clip: float | None = None,
    splits: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> DistillOutput:
    """Fused-kernel `linear_distill` (see the module docstring); arguments as `linear_distill`.

    `splits` fixes the number of vocabulary splits of the forward grid (default: `num_splits` of
    `sdpo_fast.kernels.distill_forward`, from N, the device's SMs and L2); `workspace_bytes` bounds the backward's gradient workspace. `add_tail` and `adv_clip` (both
    top-k only) are unused.
    """
    if topk is not None or adv_clip is not None:
        raise ValueError(f"impl='triton' computes the full-vocabulary divergence only, got topk={topk}, "
                         f"adv_clip={adv_clip}; use impl='chunked' (impl='auto' routes topk there)")
    _check_triton_inputs(splits, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    return distill_output(*_triton_forward(
        student_hidden.contiguous(), teacher_hidden.detach().contiguous(), weight.contiguous(),
        teacher_weight.detach().contiguous(), targets, float(alpha), float(temperature), int(ignore_index),
        splits, int(workspace_bytes),
    ))


def _check_triton_inputs(splits: int | None, **hidden: torch.Tensor) -> None:
    """ValueError unless the kernels can run on these hidden states (device, dtype) with `splits`."""
    device = next(iter(hidden.values())).device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"impl='triton' needs CUDA tensors, got device {device} (on CPU, set "
                         "TRITON_INTERPRET=1 before importing sdpo_fast to run the kernels in the slow "
                         "interpreter, or use impl='chunked')")
    for name, t in hidden.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"impl='triton' supports fp16, bf16 and fp32 inputs, got {name} of dtype {t.dtype}; "
                             "use impl='chunked' for float64")
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be None or >= 1, got {splits}")


@torch.library.custom_op("sdpo_fast::linear_logprobs_triton", mutates_args=())
def _triton_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    splits: Optional[int],
    workspace_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student-only forward in the calling convention of `custom_ops`; saved = log-normalisers [1, N]."""
    logp, entropy, lse = logprobs_forward(hidden, weight, targets, temperature=temperature,
                                          ignore_index=ignore_index, splits=splits)
    return logp.clone(), entropy[None].clone(), lse[None].clone()


@_triton_logprobs_forward.register_fake
def _(hidden, weight, targets, temperature, ignore_index, splits, workspace_bytes):
    return fake_logprobs_outputs(hidden, targets)


@torch.library.custom_op("sdpo_fast::linear_logprobs_triton_backward", mutates_args=())
def _triton_logprobs_backward(
    grad_logp: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    splits: Optional[int],
    workspace_bytes: int,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-only backward: the distill backward kernel with its divergence term (and teacher tile) off."""
    zeros = lse.new_zeros(targets.numel())
    row_stats = torch.stack([lse[0], zeros, zeros, zeros, grad_logp.float()])
    # The teacher arguments are the student's own tensors: with has_div=False the kernel never reads them.
    dh, dw = distill_backward(
        hidden, hidden, weight, weight, targets, row_stats, alpha=1.0, temperature=temperature,
        ignore_index=ignore_index, has_div=False, has_logp=True, need_h=need_h, need_w=need_w,
        workspace_bytes=workspace_bytes,
    )
    return dh.to(hidden.dtype) if need_h else hidden.new_empty(0), dw if need_w else weight.new_empty(0)


@_triton_logprobs_backward.register_fake
def _(grad_logp, hidden, weight, targets, lse, temperature, ignore_index, splits, workspace_bytes, need_h, need_w):
    return fake_backward_outputs(hidden, weight, need_h, need_w)


register_logprobs_autograd(_triton_logprobs_forward, _triton_logprobs_backward)


def linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    splits: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> LogProbOutput:
    """Fused-kernel `linear_logprobs`; arguments as `linear_logprobs`, `splits` / `workspace_bytes` as
    `linear_distill_triton`."""
    _check_triton_inputs(splits, hidden=hidden)
    return logprobs_output(*_triton_logprobs_forward(
        hidden.contiguous(), weight.contiguous(), targets, float(temperature), int(ignore_index), splits,
        int(workspace_bytes),
    ))
