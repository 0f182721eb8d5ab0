"""Process group set-up, FSDP2 sharding (fully_shard per decoder layer, then the root), its inverse (full,
Hugging Face-named copies of sharded parameters, one at a time, for a rollout engine's weights), and the
reductions over ranks that the trainer's metrics and checkpoints need.

One process without torchrun runs unsharded; under torchrun the backend is NCCL on CUDA and gloo on
CPU. The root group holds the embeddings, the final norm and the LM head (tied embeddings stay in one
group), so the fused op must run inside a forward of the root module; see `register_fsdp_forward_method`
use in the trainer. Every reduction is a no-op without a process group, and under one must be called
by every rank in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sdpo_fast.integrations.hf import gathered

# Module-name segments that wrappers insert into parameter names: activation checkpointing
# (checkpoint_wrapper), FSDP1, torch.compile. FSDP2's fully_shard changes classes in place, not names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, device, and the FSDP mesh (None when unsharded)."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(rank=0, world_size=1, device=torch.device(device), mesh=None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(dev.type, (world_size,))
    return Runtime(rank=dist.get_rank(), world_size=world_size, device=dev, mesh=mesh)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama / Qwen2 / Qwen3 layout)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList; cannot shard it per layer")
    return layers


def shard_model(root: nn.Module, lm: nn.Module, runtime: Runtime, *, mixed_precision: bool = False,
                activation_checkpointing: bool = False) -> nn.Module:
    """Apply activation checkpointing and FSDP2 in place: each decoder layer of `lm`, then `root`.

    `root` is the module whose forward (and registered forward methods) use the root-group weights
    (embeddings, final norm, LM head); it contains `lm`. mixed_precision (GPU): parameters gathered in
    bf16, gradients reduced in fp32.
    """
    layers = decoder_layers(lm)
    if activation_checkpointing:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if runtime.mesh is None:
        return root
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mesh": runtime.mesh, **({"mp_policy": mp} if mp is not None else {})}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return root


def hf_param_name(name: str) -> str:
    """The Hugging Face name of a parameter whose module path went through wrappers (WRAPPER_PREFIXES).

    'model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj.weight'
    """
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every parameter of `model`, gathered one parameter at a time.

    Under FSDP2 every rank must consume the iterator to the end in the same order (each item is an
    all-gather). `dtype` casts the local shard before gathering (bf16 halves the traffic). Tied parameters
    appear once, under their first name (a tied LM head is absent, as in the model's state dict).
    """
    for name, param in model.named_parameters():
        local = param.detach()
        if dtype is not None:
            local = local.to(dtype)
        yield hf_param_name(name), gathered(local)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def _ranks() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_over_ranks(value: float, device: torch.device) -> float:
    """The sum of every rank's `value` (`device`: where the backend reduces, the GPU under NCCL)."""
    if _ranks() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value of `metrics` over the ranks where it is defined (every rank has the same keys;
    NaN marks a value undefined on a rank, e.g. a diagnostic without pairs there; NaN only where no rank
    has it)."""
    if _ranks() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    defined = ~values.isnan()
    t = torch.cat([values.nan_to_num(0.0), defined.double()])  # sums and counts in one reduction
    dist.all_reduce(t)
    sums, counts = t.tolist()[: len(keys)], t.tolist()[len(keys):]
    return {k: s / c if c else float("nan") for k, s, c in zip(keys, sums, counts)}


def concat_over_ranks(values: list) -> list:
    """Every rank's `values`, concatenated in rank order."""
    if _ranks() == 1:
        return list(values)
    parts: list = [None] * _ranks()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def union_over_ranks(metrics: dict[str, Any]) -> dict[str, Any]:
    """The union of every rank's `metrics` (keys distinct per rank, e.g. GPU telemetry)."""
    if _ranks() == 1:
        return metrics
    parts: list = [None] * _ranks()
    dist.all_gather_object(parts, metrics)
    return {k: v for part in parts for k, v in part.items()}
