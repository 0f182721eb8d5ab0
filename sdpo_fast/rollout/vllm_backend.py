"""Rollouts with vLLM, colocated with the trainer: one engine per rank on that rank's GPU.

Life cycle in a training step (see `sdpo_fast.train.trainer`):

    generate()  -> Rollouts with the sampler's per-token log-probs (after temperature: `processed_logprobs`)
    sleep(discard_weights=True)       # KV cache and weights released while the trainer scores and updates
    load_weights(full_weights(lm))    # after the optimizer step: wakes the weights, copies them one
                                      # parameter at a time, marks the prefix cache stale
    generate()  -> wakes the KV cache, resets the prefix cache, samples with the new weights

The engine starts from the model's config only (`load_format="dummy"`, no tokenizer: prompts go in as
token ids and responses come back as token ids), so it never reads a checkpoint; the trainer pushes the
initial weights right away. It runs in-process (`distributed_executor_backend="external_launcher"`, V1
multiprocessing off), so weights pass to vLLM's `load_weights` by reference, and under torchrun every rank
runs its own tensor-parallel-1 engine on its share of the prompts.

vllm is imported lazily: this module imports on any machine; `require_vllm` says what is missing.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import tempfile
from typing import Iterable, Sequence

import torch

from sdpo_fast.rollout.hf import SamplingConfig
from sdpo_fast.rollout.types import Rollouts

INSTALL_HINT = "pip install 'sdpo-fast[gpu]'"


def require_vllm(device: torch.device | str | None = None) -> None:
    """Raise ImportError when vllm is not installed, RuntimeError when there is no CUDA GPU to run it on."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"rollout backend 'vllm' needs the vllm package, which is not installed ({exc}); "
                          f"install it on a machine with an NVIDIA GPU with `{INSTALL_HINT}`, or use --rollout hf"
                          ) from exc
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        where = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the trainer runs on {device}"
        raise RuntimeError(f"rollout backend 'vllm' needs a CUDA GPU, but {where}; use --rollout hf "
                           "(or --device cuda on a GPU machine)")


def rollouts_from_outputs(prompts: Sequence[Sequence[int]], n: int, outputs: Sequence) -> Rollouts:
    """`Rollouts` from vLLM `RequestOutput`s (one per prompt, `n` completions each, sampled-token logprobs).

    A completion keeps its stop token (it is part of `token_ids`, so the policy learns to stop) and is
    truncated when vLLM finished it for length.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    responses, truncated, logprobs = [], [], []
    for output in outputs:
        if len(output.outputs) != n:
            raise ValueError(f"vLLM returned {len(output.outputs)} completions for a prompt, expected n={n}")
        for completion in output.outputs:
            ids = list(completion.token_ids)
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise ValueError("vLLM completion has no per-token logprobs; sample with SamplingParams(logprobs=0)")
            responses.append(ids)
            truncated.append(completion.finish_reason == "length")
            logprobs.append(torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, ids)],
                                         dtype=torch.float32))
    return Rollouts(prompts=[list(p) for p in prompts], responses=responses, truncated=truncated, n=n,
                    logprobs=logprobs)


def write_engine_config(model, directory: str | os.PathLike) -> None:
    """The model's config.json for vLLM, with `architectures` set (a model built from a config has none).

    The class name is the model's Hugging Face class, also when a wrapper (e.g. FSDP2) swapped its class.
    """
    config = copy.deepcopy(model.config)
    if not config.architectures:
        name = next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None)
        if name is None:
            raise ValueError(f"{type(model).__name__} is not a Hugging Face model; vLLM needs its architecture name")
        config.architectures = [name]
    config.save_pretrained(directory)


def _load_into_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (collective_rpc): copy (name, tensor) pairs into the model's parameters."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMRollout:
    """A colocated vLLM engine for one rank (see the module docstring).

    model: the trained Hugging Face causal LM; the engine is built from its config alone (weights come with
    `load_weights`).
    sleep: release GPU memory between generations (vLLM sleep mode); otherwise the engine stays resident.
    """

    def __init__(self, model, *, device: torch.device, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, dtype: str = "bfloat16", enforce_eager: bool = False,
                 sleep: bool = True):
        require_vllm(device)
        from vllm import LLM

        _set_launcher_env(device)
        self._dir = tempfile.mkdtemp(prefix="sdpo-fast-vllm-")
        write_engine_config(model, self._dir)
        self.sleep_enabled = sleep
        self.llm = LLM(model=self._dir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype, seed=seed,
                       tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enforce_eager=enforce_eager, enable_prefix_caching=True, enable_sleep_mode=sleep,
                       logprobs_mode="processed_logprobs")
        self._asleep: set[str] = set()  # sleep-mode tags currently released ("weights", "kv_cache")
        self._weights_loaded = False    # False until the first push, and after a sleep that discards them
        self._prefix_cache_stale = False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, full tensor) pairs into the engine, e.g. `full_weights(model)`.

        Only the weights are woken (the KV cache stays released, keeping peak memory low); the prefix
        cache, which holds keys/values of the old weights, is reset before the next generation.
        """
        self._wake(["weights"])
        self.llm.collective_rpc(_load_into_worker, args=(weights,))
        self._weights_loaded = True
        self._prefix_cache_stale = True

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig, *,
                 eos_token_ids: list[int]) -> Rollouts:
        """Sample `n` responses per prompt (token ids) with their per-token log-probs under the sampler."""
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be non-empty token-id lists")
        if not self._weights_loaded:
            raise RuntimeError("the vLLM engine has no current weights (never pushed, or discarded by "
                               "sleep(discard_weights=True)); call load_weights first")
        self._wake(["weights", "kv_cache"])
        if self._prefix_cache_stale:
            self.llm.reset_prefix_cache()
            self._prefix_cache_stale = False
        params = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, stop_token_ids=list(eos_token_ids),
                                logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return rollouts_from_outputs(prompts, n, outputs)

    def sleep(self, discard_weights: bool = False) -> None:
        """Release the KV cache and the weights' GPU memory (no-op without sleep mode).

        discard_weights=False keeps a CPU copy of the weights (vLLM sleep level 1); True drops them (level 2,
        no copy), for when `load_weights` will run before the next `generate` anyway.
        """
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=2 if discard_weights else 1)
        self._asleep = {"weights", "kv_cache"}
        if discard_weights:
            self._weights_loaded = False

    def close(self) -> None:
        """Drop the engine and its config directory."""
        self.llm = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)


def _set_launcher_env(device: torch.device) -> None:
    """The variables vLLM's external launcher reads (torchrun sets them; a single process gets rank 0 of 1)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    index = device.index if device.index is not None else torch.cuda.current_device()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", str(index))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
