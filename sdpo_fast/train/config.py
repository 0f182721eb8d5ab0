"""Typed configuration of a training run: dataclasses parsed by tyro, optionally seeded from a YAML file.

Every field has a default (the embedded default run), a YAML file given with `--config` replaces
defaults, and command-line flags override both. Values are checked when the dataclasses are built,
so a bad value fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass
class SamplingOptions:
    """How rollouts are sampled."""

    max_new_tokens: int = 64
    """Response-length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature (also divides both logit streams in the loss)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""

    def __post_init__(self) -> None:
        _positive("sampling.max_new_tokens", self.max_new_tokens)
        _positive("sampling.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class OptimOptions:
    """AdamW with linear warm-up then constant learning rate."""

    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip)
        for b in self.betas:
            _unit("optim.betas", b)


@dataclass
class LossOptions:
    """The objective. algorithm=sdpo uses alpha/topk/is_clip; grpo the clip settings; blend both."""

    full_logit_distillation: bool = True
    """SDPO on full distributions (True) or the sampled-token form (False, needs alpha=1)."""
    alpha: float = 0.5
    """0: KL(teacher||student); 1: KL(student||teacher); else generalized JSD."""
    topk: int | None = None
    """None: full vocabulary (the fused op's strength); k: the student's top-k support (reference: 100)."""
    add_tail: bool = True
    is_clip: float | None = 2.0
    """Truncation of the token-level importance weight min(p_trainer(y) / p_rollout(y), is_clip) that corrects
    the mismatch between the rollout engine's and the trainer's log-probs (sdpo modes, --rollout vllm;
    grpo/blend use the rollout log-probs in their clipped ratio instead). None: no correction."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    """Coefficient of a KL to the initial policy (0: none, as the reference)."""
    blend_lambda: float = 0.9
    """A = lambda * A_GRPO + (1 - lambda) * A_SDPO for algorithm=blend."""
    adv_clip: float | None = None
    grpo_norm_by_std: bool = True
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"

    def __post_init__(self) -> None:
        _unit("loss.alpha", self.alpha)
        _unit("loss.blend_lambda", self.blend_lambda)
        if not self.full_logit_distillation and self.alpha != 1.0:
            raise ValueError("loss.full_logit_distillation=False (sampled-token SDPO) needs loss.alpha=1")
        if self.topk is not None:
            _positive("loss.topk", self.topk)


@dataclass
class RepromptOptions:
    """What the self-teacher sees: demonstrations from successful siblings and environment feedback."""

    success_reward_threshold: float = 0.5
    dont_reprompt_on_self_success: bool = True
    remove_thinking_from_demonstration: bool = True
    include_environment_feedback: bool = True
    environment_feedback_only_without_solution: bool = True
    max_reprompt_len: int = 10240

    def __post_init__(self) -> None:
        _unit("reprompt.success_reward_threshold", self.success_reward_threshold)
        _positive("reprompt.max_reprompt_len", self.max_reprompt_len)


@dataclass
class VLLMOptions:
    """The vLLM rollout engine (--rollout vllm): one engine per rank, colocated with the trainer on its GPU."""

    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory vLLM takes for weights and KV cache while awake."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens (None: the model's maximum; smaller saves KV-cache memory)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = False
    """Skip CUDA-graph capture (faster start, slower decoding)."""
    sleep: bool = True
    """Release vLLM's GPU memory (weights and KV cache) between generation and training."""

    def __post_init__(self) -> None:
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None:
            _positive("vllm.max_model_len", self.max_model_len)


@dataclass
class EvalOptions:
    """Held-out evaluation: greedy decoding on the task's held-out split, reward = all tests pass."""

    problems: int = 64
    every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    max_new_tokens: int | None = None
    """None: the sampling cap."""

    def __post_init__(self) -> None:
        _positive("eval.problems", self.problems, allow_zero=True)
        _positive("eval.every", self.every, allow_zero=True)


@dataclass
class TrainConfig:
    """Train a causal LM with SDPO (or GRPO, or their blend) on a task with rich feedback."""

    model: str = "smollm2-135m"
    """'smollm2-135m' (packaged), 'tiny-random', or a local Hugging Face model directory."""
    task: str = "arithmetic"
    """A built-in task ('arithmetic', 'string', 'code'), 'humaneval', 'code:FILE.jsonl' or 'math:FILE.jsonl'."""
    task_options: dict[str, str] = field(default_factory=dict)
    """Knobs of a built-in task generator as KEY VALUE pairs, e.g. `--task-options digits 3 feedback hint`
    (feedback: format|hint|answer)."""
    algorithm: Literal["sdpo", "grpo", "blend"] = "sdpo"
    teacher: Literal["ema", "live", "frozen", "trust_region"] = "ema"
    tau: float = 0.05
    """EMA rate (teacher=ema) or mixing coefficient (teacher=trust_region)."""
    max_steps: int = 30
    output_dir: Path = Path("runs/sdpo")
    resume: bool = False
    """Continue from the latest checkpoint in output_dir/checkpoints."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 4
    micro_batch_size: int = 8
    """Rollouts per scoring micro-batch (gradients accumulate over the step's micro-batches)."""
    generation_batch_size: int = 64
    """Sequences per `generate` call."""
    env_workers: int = 2
    """Processes evaluating responses in the environment."""
    env_timeout_s: float = 60.0
    """Per-response evaluation timeout; a response that hits it gets reward 0."""
    share_prefix: bool = True
    """Encode each shared prompt once when scoring."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk (0: write none; a checkpoint holds model, optimizer and teacher, about
    16 bytes per parameter)."""
    export: bool = True
    """Write the trained model as a Hugging Face directory (output_dir/model) at the end."""
    mixed_precision: bool = False
    """bf16 parameters / fp32 reductions under FSDP2 (GPU)."""
    activation_checkpointing: bool = False
    rollout: Literal["hf", "vllm"] = "hf"
    """Rollout backend: 'hf' (Hugging Face generate, any device) or 'vllm' (CUDA, `pip install 'sdpo-fast[gpu]'`;
    its log-probs correct the sampler/trainer mismatch, see docs/scaling.md)."""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    reprompt: RepromptOptions = field(default_factory=RepromptOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        for name in ("max_steps", "prompts_per_step", "rollouts_per_prompt", "micro_batch_size",
                     "generation_batch_size", "env_workers", "env_timeout_s"):
            _positive(name, getattr(self, name))
        _positive("save_every", self.save_every, allow_zero=True)
        _positive("keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        if self.save_every and not self.keep_checkpoints:
            raise ValueError(f"save_every={self.save_every} needs keep_checkpoints >= 1 (0 writes no checkpoint)")
        _unit("tau", self.tau)


def load_yaml(cls: type, path: Path) -> Any:
    """An instance of dataclass `cls` from a YAML file (nested mappings for nested dataclasses)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, data, prefix="")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"config {prefix or 'file'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = from_dict(type(current), value, prefix=f"{prefix}{name}.")
        elif isinstance(current, Path):
            kwargs[name] = Path(value)
        elif isinstance(current, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
