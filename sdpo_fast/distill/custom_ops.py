"""Autograd for the `linear_distill` implementations registered as torch.library custom ops.

Running an implementation inside a custom op lets `torch.compile` trace code that calls `linear_distill`:
the op is opaque to the compiler, so its data-dependent internals (which rows are ignored, chunk loops,
kernel launches) run eagerly inside the compiled graph.

Calling convention shared by the `linear_distill` ops (chunked, triton):
    forward(student_hidden, teacher_hidden, weight, teacher_weight, targets, *params)
        -> (divergence [N], student_logp [N], detached [3, N] = (teacher_logp, advantage, entropy), *saved)
    backward(grad_divergence | None, grad_student_logp | None, student_hidden, teacher_hidden, weight,
             teacher_weight, targets, *saved, *params, need_hidden, need_weight)
        -> (grad_student_hidden, grad_weight), each an empty tensor when not needed.

and by the student-only `linear_logprobs` ops:
    forward(hidden, weight, targets, *params) -> (logp [N], detached [1, N] = (entropy,), *saved)
    backward(grad_logp | None, hidden, weight, targets, *saved, *params, need_hidden, need_weight)
        -> (grad_hidden, grad_weight).
"""

from __future__ import annotations

import torch

from sdpo_fast.distill.output import DistillOutput, LogProbOutput

_DISTILL_TENSOR_INPUTS = 5  # student_hidden, teacher_hidden, weight, teacher_weight, targets
_LOGPROBS_TENSOR_INPUTS = 3  # hidden, weight, targets


def register_autograd(forward_op, backward_op, *, tensor_inputs: int, grad_outputs: int, weight_arg: int) -> None:
    """Make `forward_op` differentiable w.r.t. its input 0 (hidden states) and `weight_arg` through `backward_op`.

    `forward_op` returns `grad_outputs` differentiable tensors, one detached tensor, then the tensors
    `backward_op` needs besides the first `tensor_inputs` inputs (see the module docstring).
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_inputs], *output[grad_outputs + 1:])
        ctx.params = inputs[tensor_inputs:]
        ctx.mark_non_differentiable(*output[grad_outputs:])
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        grads = grads[:grad_outputs]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[weight_arg]
        result = [None] * (tensor_inputs + len(ctx.params))
        if all(g is None for g in grads) or not (need_h or need_w):
            return tuple(result)
        grad_h, grad_w = backward_op(*grads, *ctx.saved_tensors, *ctx.params, need_h, need_w)
        result[0] = grad_h if need_h else None
        result[weight_arg] = grad_w if need_w else None
        return tuple(result)

    forward_op.register_autograd(backward, setup_context=setup_context)


def register_distill_autograd(forward_op, backward_op) -> None:
    """Make a `linear_distill` forward op differentiable w.r.t. student_hidden and weight."""
    register_autograd(forward_op, backward_op, tensor_inputs=_DISTILL_TENSOR_INPUTS, grad_outputs=2, weight_arg=2)


def register_logprobs_autograd(forward_op, backward_op) -> None:
    """Make a `linear_logprobs` forward op differentiable w.r.t. hidden and weight."""
    register_autograd(forward_op, backward_op, tensor_inputs=_LOGPROBS_TENSOR_INPUTS, grad_outputs=1, weight_arg=1)


def distill_output(div: torch.Tensor, logp: torch.Tensor, detached: torch.Tensor, *_saved) -> DistillOutput:
    """The `DistillOutput` of a forward op's results."""
    return DistillOutput(div, logp, *detached)


def logprobs_output(logp: torch.Tensor, detached: torch.Tensor, *_saved) -> LogProbOutput:
    """The `LogProbOutput` of a `linear_logprobs` forward op's results."""
    return LogProbOutput(logp, detached[0])


def fake_logprobs_outputs(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shapes of (logp, detached [1, N], saved [1, N]) for the `linear_logprobs` ops' fake implementations."""
    n, dtype = targets.shape[0], torch.promote_types(hidden.dtype, torch.float32)
    new = hidden.new_empty
    return new(n, dtype=dtype), new(1, n, dtype=dtype), new(1, n, dtype=dtype)


def fake_forward_outputs(student_hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shapes of (divergence, student_logp, detached, saved [3, N]) for the ops' fake implementations."""
    n, dtype = targets.shape[0], torch.promote_types(student_hidden.dtype, torch.float32)
    new = student_hidden.new_empty
    return new(n, dtype=dtype), new(n, dtype=dtype), new(3, n, dtype=dtype), new(3, n, dtype=dtype)


def fake_backward_outputs(student_hidden: torch.Tensor, weight: torch.Tensor, need_h: bool,
                          need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of (grad_student_hidden, grad_weight) for the ops' fake implementations."""
    return (torch.empty_like(student_hidden) if need_h else student_hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))
