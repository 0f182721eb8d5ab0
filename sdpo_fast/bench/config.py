"""Options of `sdpo-fast bench` (dataclasses parsed by tyro). Shape options left at None take the
device's default: small on CPU (a few minutes on 2 cores), LLM-sized on a GPU."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SECTIONS = ("op", "scoring", "step", "algorithm")


@dataclass
class OpOptions:
    """The fused op `linear_distill`, forward + backward, per implementation."""

    n: list[int] | None = None
    """Token counts (CPU default 256 1024; GPU 2048 8192)."""
    hidden: int | None = None
    """CPU default 512; GPU 4096."""
    vocab: int | None = None
    """CPU default 32000; GPU 151936."""
    alpha: list[float] = field(default_factory=lambda: [0.5])
    """Divergence mixtures: 0 KL(T||S), 1 KL(S||T), else the generalized JSD."""
    impls: list[str] | None = None
    """CPU default naive chunked; GPU adds triton and liger (when installed)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """GPU only; CPU runs fp32."""
    chunk_elems: int | None = None
    """Elements of one [C, V] block of impl chunked (None: the op's default)."""
    mem_limit_gb: float = 20.0
    """CPU: address-space limit of each case's child process (beyond it the row reads "out of memory")."""
    warmup: int = 1
    repeats: int = 3


@dataclass
class ScoringOptions:
    """Shared-prefix scoring against the unshared batch."""

    shapes: list[str] = field(default_factory=lambda: ["256x64", "64x256"])
    """PROMPTxRESPONSE token counts."""
    g: int = 8
    """Rollouts per prompt."""
    demo: int = 64
    """Demonstration tokens in the teacher context."""
    layers: int = 4
    hidden: int = 256
    backends: list[str] | None = None
    """CPU default dense segments; GPU dense segments flex."""
    max_row_tokens: int = 8192
    warmup: int = 1
    repeats: int = 3


@dataclass
class StepOptions:
    """Whole training steps, SDPO vs GRPO."""

    model: str = "tiny-random"
    task: str = "arithmetic"
    task_options: dict[str, str] = field(default_factory=dict)
    """Knobs of the built-in task, e.g. digits 1: the success rate decides how many teacher contexts
    carry a shared demonstration rather than per-rollout feedback."""
    prompts: int = 2
    rollouts: int = 4
    max_new_tokens: int = 16
    micro_batch_size: int = 8
    rollout: Literal["hf", "vllm"] = "hf"
    warmup: int = 1
    steps: int = 3


@dataclass
class AlgorithmOptions:
    """The algorithm layer's work outside the model: teacher contexts and the EMA teacher update."""

    prompts: int = 32
    """Prompts (300 random words each) in the batch of teacher contexts."""
    group: int = 8
    """Rollouts (512 random tokens each) per prompt: 30% succeed, half the failures carry feedback."""
    warmup: int = 1
    repeats: int = 7


@dataclass
class BenchConfig:
    """Benchmark the engine on this machine: the fused op, shared-prefix scoring, training steps and the
    algorithm layer's own work; prints ratio tables and writes bench.json and PNG plots to --out-dir."""

    only: list[Literal["op", "scoring", "step", "algorithm"]] = field(default_factory=lambda: list(SECTIONS))
    """Sections to run."""
    out_dir: Path = Path("runs/bench")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    """torch CPU threads (None: torch's choice)."""
    op: OpOptions = field(default_factory=OpOptions)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    step: StepOptions = field(default_factory=StepOptions)
    algorithm: AlgorithmOptions = field(default_factory=AlgorithmOptions)

    def __post_init__(self) -> None:
        for name, value in (("op.warmup", self.op.warmup), ("scoring.warmup", self.scoring.warmup),
                            ("step.warmup", self.step.warmup), ("algorithm.warmup", self.algorithm.warmup)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("op.repeats", self.op.repeats), ("scoring.repeats", self.scoring.repeats),
                            ("step.steps", self.step.steps), ("scoring.g", self.scoring.g),
                            ("algorithm.repeats", self.algorithm.repeats),
                            ("algorithm.prompts", self.algorithm.prompts), ("algorithm.group", self.algorithm.group),
                            ("op.chunk_elems", self.op.chunk_elems),
                            ("threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.op.mem_limit_gb <= 0:
            raise ValueError(f"op.mem_limit_gb must be > 0, got {self.op.mem_limit_gb}")
        for alpha in self.op.alpha:
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"op.alpha must be in [0, 1], got {alpha}")
        for shape in self.scoring.shapes:
            parts = shape.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"scoring.shapes: {shape!r} is not PROMPTxRESPONSE, e.g. 256x64")


def command_line(cfg: BenchConfig) -> str:
    """The `sdpo-fast bench` command that reproduces `cfg`: flags for the fields that differ from the defaults."""
    flags: list[str] = []

    def walk(obj, default, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, base = getattr(obj, f.name), getattr(default, f.name)
            name = prefix + f.name.replace("_", "-")
            if dataclasses.is_dataclass(value):
                walk(value, base, name + ".")
            elif value != base:
                if isinstance(value, dict):  # tyro reads a dict as KEY VALUE pairs
                    values = [word for pair in value.items() for word in pair]
                else:
                    values = value if isinstance(value, list) else [value]
                flags.append(" ".join([f"--{name}", *(shlex.quote(str(v)) for v in values)]))

    walk(cfg, BenchConfig(), "")
    return " ".join(["sdpo-fast bench", *flags])
