"""Typed configuration of a training run: one tree of dataclasses parsed by tyro, optionally seeded from YAML.

The tree embeds the algorithm layer's own settings (`LossConfig`, `RepromptConfig`) and the rollout's
`SamplingConfig` as they are. Every field has a default, a YAML file given with `--config` replaces
defaults, and command-line flags override both. Every value is checked when the dataclasses are built
(types and `Literal` choices by `check_types`, ranges by each `__post_init__`), so YAML and flags get the
same checks, and a bad value fails with a message naming the field before any model is loaded. Nothing
here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tyro
import typeguard
import yaml

from sdpo_fast.algorithm.config import LossConfig, RepromptConfig, TeacherMode
from sdpo_fast.files import plain
from sdpo_fast.rollout.sampling import SamplingConfig

# KEY VALUE pairs on the command line, also when a YAML file gives the option a default (tyro would
# otherwise turn a non-empty dict default into fixed per-key flags). The pairs replace the whole dict.
TaskOptions = Annotated[
    dict[str, str],
    tyro.constructors.PrimitiveConstructorSpec(
        nargs="*", metavar="KEY VALUE ...",
        instance_from_str=lambda args: _pairs(args),
        is_instance=lambda value: isinstance(value, dict),
        str_from_instance=lambda value: [str(s) for kv in value.items() for s in kv]),
]


def _pairs(args: list[str]) -> dict[str, str]:
    if len(args) % 2:
        raise ValueError(f"expected KEY VALUE pairs, got an odd number of words: {' '.join(args)}")
    return dict(zip(args[::2], args[1::2]))


def check_types(obj: Any, prefix: str = "") -> None:
    """Raise a ValueError naming the field if a field of dataclass `obj` (recursively) does not match its
    annotation: a `Literal` value outside its choices, a string where a number belongs, ..."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint, name = getattr(obj, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(value):
            check_types(value, name + ".")
            continue
        bad_bool = isinstance(value, bool) and _numeric(hint)
        try:
            typeguard.check_type(value, hint)
        except typeguard.TypeCheckError:
            bad_bool = True
        if bad_bool:
            raise ValueError(f"{name} must be {describe(hint)}, got {value!r}")


def _numeric(hint: Any) -> bool:
    return hint in (int, float) or any(a in (int, float) for a in typing.get_args(hint))


def describe(hint: Any) -> str:
    """A type annotation in words ("one of 'a', 'b'", "an integer or null", ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
    if hint in names:
        return names[hint]
    if origin in (dict,):
        return "a mapping"
    if origin in (tuple, list):
        return "a list"
    return str(hint)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass
class OptimOptions:
    """AdamW with linear warm-up then constant learning rate."""

    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 10
    """Steps of linear warm-up from lr / (warmup_steps + 1) to lr."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""

    def __post_init__(self) -> None:
        check_types(self, "optim.")
        _positive("optim.lr", self.lr)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip)
        for b in self.betas:
            _unit("optim.betas", b)


@dataclass
class VLLMOptions:
    """The vLLM rollout engine (--rollout vllm): one engine per rank, colocated with the trainer on its GPU."""

    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory vLLM takes for weights and KV cache while awake."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens (None: the model's maximum; smaller saves KV-cache memory)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations of the engine."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture (faster start, slower decoding)."""
    sleep: bool = True
    """Release vLLM's GPU memory (weights and KV cache) between generation and training."""

    def __post_init__(self) -> None:
        check_types(self, "vllm.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None:
            _positive("vllm.max_model_len", self.max_model_len)


@dataclass
class EvalOptions:
    """Held-out evaluation: greedy decoding on the task's held-out split, reward = all tests pass."""

    problems: int = 64
    """Held-out problems evaluated (0: no evaluation)."""
    every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    max_new_tokens: int | None = None
    """Response cap of evaluation (None: the sampling cap)."""

    def __post_init__(self) -> None:
        check_types(self, "eval.")
        _positive("eval.problems", self.problems, allow_zero=True)
        _positive("eval.every", self.every, allow_zero=True)
        if self.max_new_tokens is not None:
            _positive("eval.max_new_tokens", self.max_new_tokens)


@dataclass
class DataOptions:
    """Columns of a dataset given as --task math:PATH or code:PATH, where PATH is a Hugging Face `save_to_disk`
    directory or .parquet / .json / .jsonl files (read with `datasets`)."""

    prompt_column: str = "prompt"
    """The column holding the problem statement."""
    answer_column: str = "answer"
    """math: the column holding the reference answer."""
    tests_column: str = "tests"
    """code: the column holding stdin/stdout tests, a list of {input, output}."""
    system_prompt_column: str | None = None
    """A column holding each problem's system prompt (None: none)."""
    system_prompt: str | None = None
    """One system prompt for every problem of any task (None: none)."""
    split: str = "train"
    """The split to read from a DatasetDict directory."""

    def __post_init__(self) -> None:
        check_types(self, "data.")


@dataclass
class TrainConfig:
    """Train a causal LM with SDPO (or GRPO, or their blend) on a task with rich feedback."""

    model: str = "smollm2-135m"
    """'smollm2-135m' (packaged), 'tiny-random', or a local Hugging Face model directory."""
    task: str = "arithmetic"
    """A built-in task ('arithmetic', 'string', 'code'), 'humaneval', or 'math:PATH' / 'code:PATH' (a JSONL file,
    or a dataset: see the data options)."""
    task_options: TaskOptions = field(default_factory=dict)
    """Knobs of a built-in task generator as KEY VALUE pairs, e.g. `--task-options digits 3 ops +- feedback hint`
    (arithmetic: digits, digits_b, ops; string/code: ops, word_len; all: feedback format|hint|answer)."""
    teacher: TeacherMode = "ema"
    """The self-teacher: ema (moving average of the policy), live (the policy itself), frozen (the initial
    policy), trust_region (a mix of initial and current logits)."""
    tau: float = 0.05
    """EMA rate (teacher=ema) or mixing coefficient (teacher=trust_region)."""
    max_steps: int = 30
    """Optimizer steps of the run."""
    output_dir: Path = Path("runs/sdpo")
    """Where config.yaml, metrics.jsonl, curves.png, checkpoints/ and model/ go."""
    resume: bool = False
    """Continue the run in output_dir from its latest checkpoint, with its saved config.yaml (flags given
    with --resume override it)."""
    overwrite: bool = False
    """Start a new run in a non-empty output_dir, deleting the previous run's files there."""
    seed: int = 0
    """Seeds sampling, data order and the tiny-random model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    prompts_per_step: int = 8
    """Problems per optimizer step."""
    rollouts_per_prompt: int = 4
    """Responses sampled per problem (a group; grpo and blend need >= 2)."""
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
    """Recompute activations in backward (less memory, more time)."""
    rollout: Literal["hf", "vllm"] = "hf"
    """Rollout backend: 'hf' (Hugging Face generate, any device) or 'vllm' (CUDA, `pip install 'sdpo-fast[gpu]'`;
    its log-probs correct the sampler/trainer mismatch, see docs/scaling.md)."""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimOptions = field(default_factory=OptimOptions)
    loss: LossConfig = field(default_factory=LossConfig)
    reprompt: RepromptConfig = field(default_factory=RepromptConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)
    data: DataOptions = field(default_factory=DataOptions)

    @property
    def algorithm(self) -> str:
        """The objective (`--algorithm`, stored as loss.mode)."""
        return self.loss.mode

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, str):  # TrainConfig(output_dir="runs/x") from Python
            self.output_dir = Path(self.output_dir)
        check_types(self)
        for name in ("max_steps", "prompts_per_step", "rollouts_per_prompt", "micro_batch_size",
                     "generation_batch_size", "env_workers", "env_timeout_s"):
            _positive(name, getattr(self, name))
        _positive("save_every", self.save_every, allow_zero=True)
        _positive("keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        if self.save_every and not self.keep_checkpoints:
            raise ValueError(f"save_every={self.save_every} needs keep_checkpoints >= 1 (0 writes no checkpoint)")
        _unit("tau", self.tau)
        if self.sampling.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0 for training (it divides the logits of the loss), "
                             f"got {self.sampling.temperature!r}")
        if self.loss.uses_group_advantage and self.rollouts_per_prompt < 2:
            raise ValueError(f"--algorithm {self.loss.mode} normalises rewards within each prompt's rollouts: "
                             f"it needs rollouts_per_prompt >= 2, got {self.rollouts_per_prompt} (every advantage "
                             f"would be 0)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it anew")


@dataclass
class EvalConfig:
    """Held-out accuracy of a model on a task (greedy decoding; correct = every test passes)."""

    model: str = "smollm2-135m"
    """'smollm2-135m', 'tiny-random', or a Hugging Face directory (e.g. a run's output_dir/model)."""
    task: str = "arithmetic"
    """As `sdpo-fast train --task`."""
    task_options: TaskOptions = field(default_factory=dict)
    """Knobs of a built-in task as KEY VALUE pairs, as `sdpo-fast train --task-options`."""
    problems: int = 64
    """Held-out problems evaluated."""
    max_new_tokens: int = 64
    """Response-length cap in tokens."""
    seed: int = 0
    """The task's seed (use the training run's to evaluate on its held-out split)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    data: DataOptions = field(default_factory=DataOptions)

    def __post_init__(self) -> None:
        check_types(self)
        _positive("problems", self.problems)
        _positive("max_new_tokens", self.max_new_tokens)


# YAML spellings of fields whose flag lives elsewhere in the tree: top-level `algorithm` is `loss.mode`.
_YAML_ALIASES = {"algorithm": ("loss", "mode")}


def load_yaml(cls: type, path: Path) -> Any:
    """An instance of dataclass `cls` from a YAML file (nested mappings for nested dataclasses)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}:{where}: invalid YAML: {problem}") from None
    try:
        return from_dict(cls, data)
    except ValueError as exc:
        raise ValueError(f"--config {path}: {exc}") from None


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    data = dict(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for alias, (parent, name) in _YAML_ALIASES.items():
        if not prefix and alias in data and parent in fields:
            sub = dict(data.get(parent) or {})
            if name in sub:
                raise ValueError(f"give {alias} or {parent}.{name}, not both")
            sub[name] = data.pop(alias)
            data[parent] = sub
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, prefix=f"{prefix}{name}.")
        elif hint is Path and isinstance(value, str):
            kwargs[name] = Path(value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        elif name == "task_options" and isinstance(value, dict):
            kwargs[name] = {str(k): str(v) for k, v in value.items()}
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(prefix) else f"{prefix}{message}") from None


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-ready data (the inverse of `from_dict`)."""
    return plain(dataclasses.asdict(cfg))
