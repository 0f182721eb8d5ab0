"""Hidden states and LM heads of Hugging Face causal LMs for the fused ops, in any trainer.

The fused ops take the final norm's output at the positions that PREDICT the scored tokens (shifted by
one: position t - 1 predicts token t) and the LM head weight; they never need logits. These helpers get
both from an unmodified model, wrapped or not (DDP, DeepSpeed, PEFT, FSDP2):

- `completion_hidden`: one forward that returns those hidden states while the model computes logits for a
  single position only;
- `call_with_head`: runs `fn(lm_head_weight, ...)` as a forward method of the model, so that FSDP2 gathers
  a sharded head there and reduce-scatters its gradient (a plain call without FSDP);
- `token_logprobs`: the GRPO-style helper, per-token log-probs and entropy of a completion.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Callable, TypeVar

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from sdpo_fast.algorithm.teachers import lm_head_weight
from sdpo_fast.distill import IGNORE_INDEX, LogProbOutput, linear_logprobs

T = TypeVar("T")
_HEAD_METHOD = "sdpo_fast_call_with_head"
_HEAD_CHECKED = "_sdpo_fast_head_checked"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (FSDP2 and PEFT models are returned as is)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The [V, H] LM-head weight of a model inside any wrapper (`lm_head_weight` of `unwrap(model)`)."""
    return lm_head_weight(unwrap(model))


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, full copy of an FSDP2-sharded (DTensor) tensor (a collective), else the tensor detached.

    For stop-grad uses only (a separate teacher's head, a rollout engine's weights): the copy carries no
    gradient back to the shards. A trained head goes through `call_with_head` instead.
    """
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def call_with_head(model: nn.Module, fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(head_weight(model), *args, **kwargs)`, run as a forward method of the module owning the head.

    Under FSDP2 (`fully_shard`) the call goes through FSDP's pre/post-forward hooks
    (`register_fsdp_forward_method`) of the head's group (the head when it is sharded on its own, else the
    model's root group, where tied embeddings live): the sharded head is all-gathered for `fn`, and its
    gradient is reduce-scattered in backward like any forward's. Pass the tensors that need gradients
    (hidden states) in `args`, so FSDP sees them as the forward's inputs. Without FSDP it is a plain call.
    The method is attached to the module instance once.
    """
    module = unwrap(model)
    owner = _head_owner(module)
    if _HEAD_METHOD not in vars(owner):
        setattr(owner, _HEAD_METHOD, types.MethodType(_with_head, owner))
        try:
            from torch.distributed.fsdp import register_fsdp_forward_method
        except ImportError:  # torch built without distributed: no FSDP either
            pass
        else:
            register_fsdp_forward_method(owner, _HEAD_METHOD)
    return getattr(owner, _HEAD_METHOD)(module, fn, *args, **kwargs)


def _head_owner(module: nn.Module) -> nn.Module:
    """The module whose FSDP2 group holds the head: the head itself when sharded on its own, else the model
    (the root group, where tied embeddings live)."""
    head = module.get_output_embeddings()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return module
    return head if isinstance(head, FSDPModule) else module


def _with_head(owner: nn.Module, module: nn.Module, fn: Callable[..., T], *args, **kwargs) -> T:
    return fn(head_weight(module), *args, **kwargs)


def completion_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      num_tokens: int, **model_kwargs) -> torch.Tensor:
    """[B, num_tokens, H] final-norm hidden states that predict the last `num_tokens` tokens of `input_ids`.

    That is positions L - num_tokens - 1 ... L - 2 of a [B, L] input (shifted by one), as
    `logits[:, -num_tokens - 1:-1]` would be. One forward through `model` itself, so DDP, FSDP and PEFT
    wrappers work unchanged; the model is asked for the last hidden state only (`output_hidden_states=-1`)
    and for the logits of one position (`logits_to_keep=1`). On the first call per model, a model whose
    logits are not a plain linear head of the last hidden state (final-logit soft-capping, logit scaling:
    by config, and those logits against hidden @ head^T) raises ValueError instead of training on wrong
    numbers.
    """
    if not 1 <= num_tokens < input_ids.shape[-1]:
        raise ValueError(f"num_tokens must be in [1, L - 1] for input_ids of length L = {input_ids.shape[-1]}, "
                         f"got {num_tokens}")
    kwargs = dict(model_kwargs, input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  output_hidden_states=-1)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    else:
        warnings.warn(f"{type(unwrap(model)).__name__}.forward has no `logits_to_keep`: it materialises the "
                      "logits of every position, which the fused loss does not use", stacklevel=2)
    out = model(**kwargs)
    hidden = out.hidden_states[-1]
    _check_plain_head(model, hidden[:, -1], out.logits[:, -1])
    return hidden[:, -num_tokens - 1:-1]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    module = unwrap(model)
    if hasattr(module, "get_base_model"):  # PEFT
        module = module.get_base_model()
    return "logits_to_keep" in inspect.signature(module.forward).parameters


# Config fields of Hugging Face models that post-process the logits after the LM head (value: neutral).
_LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                         "lm_head_multiplier": 1.0, "output_multiplier": 1.0}


@torch.no_grad()
def _check_plain_head(model: nn.Module, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
    """Once per model: its logits are last_hidden @ head^T, by config and numerically.

    The numeric tolerance is that of bf16 (2% of the largest logit), since under mixed precision the
    model's own logits are computed in bf16: it catches post-processing the config does not name.
    """
    module = unwrap(model)
    if getattr(module, _HEAD_CHECKED, False):
        return
    config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    for key, neutral in _LOGIT_POSTPROCESSING.items():
        value = getattr(config, key, None)
        if value is not None and value != neutral:
            raise ValueError(f"{type(module).__name__} post-processes its logits ({key}={value}), which the fused "
                             "ops do not reproduce")
    weight = gathered(head_weight(module))
    ours = (last_hidden.to(weight.dtype) @ weight.T).float()
    theirs = last_logits.float()
    if not torch.allclose(ours, theirs, rtol=2e-2, atol=2e-2 * (1.0 + float(theirs.abs().max()))):
        raise ValueError(
            f"{type(module).__name__}'s logits are not last_hidden_state @ lm_head.weight^T (max difference "
            f"{float((ours - theirs).abs().max()):.3g}): the model post-processes its logits, which the fused "
            "ops do not reproduce")
    setattr(module, _HEAD_CHECKED, True)


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype | None = None,
    impl: str = "auto",
    **model_kwargs,
) -> LogProbOutput:
    """GRPO-style per-token log p(y_t) [B, T] (with grad) and entropy (detached) of a completion, no logits.

    `completion_ids` [B, T] are the last T tokens of `input_ids` [B, L] (a left-padded prompt followed by
    a right-padded completion, as TRL and verl lay them out); positions where `completion_mask` is 0 give
    0 and no gradient. The LM head is applied inside `call_with_head`, so FSDP2-sharded heads work.
    `dtype` is the head's compute dtype (e.g. torch.bfloat16 for fp32 weights under bf16 mixed precision,
    as autocast would run the head); default: the weight's.
    """
    hidden = completion_hidden(model, input_ids, attention_mask, completion_ids.shape[-1], **model_kwargs)
    targets = (completion_ids if completion_mask is None
               else completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX))

    def run(weight: torch.Tensor, hidden: torch.Tensor) -> LogProbOutput:
        weight = weight.to(dtype or weight.dtype)
        return linear_logprobs(hidden.to(weight.dtype), weight, targets, temperature=temperature, impl=impl)

    return call_with_head(model, run, hidden)
