"""The public fused ops `linear_distill` and `linear_logprobs`: argument checks and dispatch to an implementation."""

from __future__ import annotations

import math
from typing import Callable

import torch

from sdpo_fast.distill.chunked import linear_distill_chunked, linear_logprobs_chunked
from sdpo_fast.distill.naive import linear_distill_naive, linear_logprobs_naive
from sdpo_fast.distill.output import DistillOutput, LogProbOutput

IMPLS = ("naive", "chunked", "triton", "auto")
IGNORE_INDEX = -100  # the target of a row to skip (PyTorch's cross-entropy convention)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_distill(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    topk: int | None = None,
    add_tail: bool = True,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    adv_clip: float | None = None,
) -> DistillOutput:
    """Per-token student-vs-teacher divergence and token log-probs straight from hidden states.

    Args:
        student_hidden: [N, H] (or [..., H]) student hidden states; gradients flow to it.
        teacher_hidden: [N, H_t] (or [..., H_t]); always treated as stop-grad. H_t is the teacher head's
            width: H without `teacher_weight`. A different width lets callers mix heads, e.g. the
            trust-region teacher lerp(b_ref, b_cur, tau) as [(1 - tau) h_ref, tau h_cur] @ [W_ref, W_cur]^T.
        weight: [V, H] student LM head; gradients flow to it.
        targets: [N] (or [...]) integer sampled tokens; rows equal to `ignore_index` give 0 and no gradient.
        teacher_weight: [V, H_t] separate teacher head (EMA teacher); None uses `weight` (stop-grad on the
            teacher side).
        alpha: 0 KL(teacher||student); 1 KL(student||teacher); otherwise the generalized JSD.
        temperature: both logit streams are divided by it.
        topk: None for the full vocabulary; k for the student's top-k support.
        add_tail: with `topk`, one tail bucket on both sides; False renormalises the top-k.
        ignore_index: target value of rows to skip.
        impl: "naive" (materialises logits; the specification), "chunked" (pure PyTorch, bounded
            memory), "triton" (fused kernels), or "auto": Triton for fp16/bf16 CUDA inputs without
            `topk`, else chunked (fp32 inputs go to chunked's fp32 cuBLAS GEMMs; impl="triton" runs
            fp32 on 3xTF32 tensor-core products, about fp32 accuracy, small tiles, unmeasured speed).
        adv_clip: advantage clipping c > 0 for the reverse KL (alpha = 1) on a top-k support: each
            support token's advantage log q - log p enters the gradient clamped to [-c, c] (see
            `formulas.clip_teacher`; the divergence reported is the matching clipped one). None: off.

    Returns:
        `DistillOutput` of per-token tensors shaped like `targets`.
    """
    _check_args(student_hidden, teacher_hidden, weight, targets, teacher_weight, alpha, temperature, topk,
                ignore_index, impl, adv_clip)
    if teacher_weight is None:
        teacher_weight = weight
    lead_shape = targets.shape
    run = _resolve_impl("distill", impl, student_hidden.device, topk, student_hidden.dtype)
    out = run(
        student_hidden.reshape(-1, weight.shape[1]),
        teacher_hidden.reshape(-1, teacher_weight.shape[1]),
        weight,
        teacher_weight,
        _validated_targets(targets.reshape(-1), weight.shape[0], int(ignore_index)),
        alpha=float(alpha),
        temperature=float(temperature),
        topk=topk,
        add_tail=bool(add_tail),
        ignore_index=int(ignore_index),
        adv_clip=None if adv_clip is None else float(adv_clip),
    )
    return out.reshape(*lead_shape)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> LogProbOutput:
    """Per-token log p(target) and entropy straight from hidden states and the LM head, without logits.

    The student-only half of `linear_distill` for GRPO-style objectives: no teacher, no second GEMM.

    Args:
        hidden: [N, H] (or [..., H]) hidden states (the final norm's output); gradients flow to it.
        weight: [V, H] LM head; gradients flow to it.
        targets: [N] (or [...]) integer token ids; rows equal to `ignore_index` give 0 and no gradient.
        temperature: the logits are divided by it.
        ignore_index: target value of rows to skip.
        impl: "naive" (materialises logits; the specification), "chunked" (pure PyTorch, bounded memory),
            "triton" (fused kernels), or "auto" (Triton for fp16/bf16 CUDA inputs, else chunked; fp32 as
            in `linear_distill`).

    Returns:
        `LogProbOutput(logp, entropy)` of per-token tensors shaped like `targets`; `logp` is
        differentiable w.r.t. `hidden` and `weight`, `entropy` is detached.
    """
    _check_tensors(hidden=hidden, weight=weight, targets=targets)
    _check_impl(impl)
    _check_head("hidden", hidden, weight, targets)
    _check_float_dtypes(hidden=hidden, weight=weight)
    _check_same_dtype("hidden", hidden, "weight", weight)
    _check_targets_and_devices(targets, hidden=hidden, weight=weight)
    _check_scalars(temperature, ignore_index)
    lead_shape = targets.shape
    run = _resolve_impl("logprobs", impl, hidden.device, None, hidden.dtype)
    out = run(
        hidden.reshape(-1, weight.shape[1]),
        weight,
        _validated_targets(targets.reshape(-1), weight.shape[0], int(ignore_index)),
        temperature=float(temperature),
        ignore_index=int(ignore_index),
    )
    return out.reshape(*lead_shape)


def _resolve_impl(op: str, impl: str, device: torch.device, topk: int | None,
                  dtype: torch.dtype) -> Callable[..., DistillOutput | LogProbOutput]:
    """The implementation function of `op` ("distill": `linear_distill`, "logprobs": `linear_logprobs`) for `impl`.

    "auto" takes Triton for fp16/bf16 CUDA inputs without `topk` (the kernels cover the full vocabulary
    only), else "chunked" (fp32 too: its GEMMs are cuBLAS fp32, the kernels' fp32 path runs small
    3xTF32 tiles). "triton" without the triton package raises ValueError.
    """
    if impl == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        use_triton = device.type == "cuda" and topk is None and half and _triton_available()
        impl = "triton" if use_triton else "chunked"
    elif impl == "triton" and not _triton_available():
        raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='chunked'")
    if impl == "triton":
        from sdpo_fast.distill import triton_impl  # imports triton lazily

        return getattr(triton_impl, f"linear_{op}_triton")
    return _TORCH_IMPLS[op, impl]


_TORCH_IMPLS = {("distill", "naive"): linear_distill_naive, ("distill", "chunked"): linear_distill_chunked,
                ("logprobs", "naive"): linear_logprobs_naive, ("logprobs", "chunked"): linear_logprobs_chunked}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_args(student_hidden, teacher_hidden, weight, targets, teacher_weight, alpha, temperature, topk,
                ignore_index, impl, adv_clip=None):
    """Raise ValueError naming the offending argument; never let a bad input give a silent number."""
    _check_tensors(student_hidden=student_hidden, teacher_hidden=teacher_hidden, weight=weight, targets=targets)
    if teacher_weight is not None and not isinstance(teacher_weight, torch.Tensor):
        raise ValueError(f"teacher_weight must be a torch.Tensor or None, got {type(teacher_weight).__name__}")
    _check_impl(impl)

    _check_head("student_hidden", student_hidden, weight, targets)
    vocab, hidden = weight.shape
    if teacher_weight is not None and (teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab):
        raise ValueError(f"teacher_weight must be [V={vocab}, H_t], got shape {tuple(teacher_weight.shape)}")
    teacher_size = hidden if teacher_weight is None else teacher_weight.shape[1]
    if teacher_hidden.shape != (*student_hidden.shape[:-1], teacher_size):
        raise ValueError(f"teacher_hidden must have shape {(*student_hidden.shape[:-1], teacher_size)} "
                         f"(student_hidden.shape[:-1] + teacher head width), got {tuple(teacher_hidden.shape)}")

    _check_float_dtypes(student_hidden=student_hidden, teacher_hidden=teacher_hidden, weight=weight,
                        teacher_weight=teacher_weight)
    _check_same_dtype("student_hidden", student_hidden, "weight", weight)
    if teacher_weight is None:
        _check_same_dtype("teacher_hidden", teacher_hidden, "weight", weight)
    else:
        _check_same_dtype("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    _check_targets_and_devices(targets, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                               weight=weight, teacher_weight=teacher_weight)

    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_scalars(temperature, ignore_index)
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab):
        raise ValueError(f"topk must be None or an int in [1, V={vocab}], got {topk!r}")
    if adv_clip is not None:
        if isinstance(adv_clip, bool) or not isinstance(adv_clip, (int, float)) or not 0 < adv_clip < math.inf:
            raise ValueError(f"adv_clip must be None or a finite number > 0, got {adv_clip!r}")
        if float(alpha) != 1.0 or topk is None:
            raise ValueError(f"adv_clip clips the reverse KL's per-token advantages on a top-k support: it needs "
                             f"alpha=1 and topk set, got alpha={alpha!r}, topk={topk!r}")


def _check_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_head(hidden_name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """weight is [V, H], the hidden states are [..., H] and the targets [...] (their leading shape)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    size = weight.shape[1]
    if hidden.dim() < 2 or hidden.shape[-1] != size:
        raise ValueError(f"{hidden_name} must be [N, {size}] (or [..., {size}]) to match weight [V, H], "
                         f"got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal {hidden_name}.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")


def _check_float_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")


def _check_same_dtype(name: str, t: torch.Tensor, head_name: str, head: torch.Tensor) -> None:
    if t.dtype != head.dtype:
        raise ValueError(f"{name} dtype {t.dtype} must equal {head_name} dtype {head.dtype}")


def _check_targets_and_devices(targets: torch.Tensor, **tensors) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    devices = {t.device for t in (targets, *tensors.values()) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _check_scalars(temperature, ignore_index) -> None:
    # `0 < t < inf` rather than math.isfinite: torch.compile(dynamic=True) cannot trace the latter.
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


@torch.library.custom_op("sdpo_fast::validated_targets", mutates_args=())
def _validated_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """`targets` as int64 after the range check.

    A custom op so that `torch.compile` keeps this data-dependent check: the compiler cannot see into
    the op, which runs eagerly inside the compiled graph and raises there.
    """
    _check_target_range(targets, vocab, ignore_index)
    return targets.to(torch.int64, copy=True)


@_validated_targets.register_fake
def _(targets, vocab, ignore_index):
    return torch.empty_like(targets, dtype=torch.int64)


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target must be a token id in [0, V) or the ignore index.

    On the CPU a ValueError names the first bad id. On a GPU the check is an asynchronous device-side
    assertion (`torch._assert_async`): no host sync, so the op stays capturable in a CUDA graph; a bad
    id stops the process at the next synchronisation with the message below (the CUDA context is lost).
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    message = f"targets must be token ids in [0, V={vocab}) or ignore_index={ignore_index}"
    if targets.device.type != "cpu":
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}; found {int(targets[bad][0])}")
