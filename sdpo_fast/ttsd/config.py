"""Settings of test-time search (`sdpo-fast ttsd`) and of the discovery@k experiment
(`sdpo-fast ttsd-experiment`): plain dataclasses parsed by tyro, checked when built (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdpo_fast.algorithm.config import LossConfig
from sdpo_fast.rollout.sampling import SamplingConfig
from sdpo_fast.train.config import OptimOptions, TrainConfig

METHODS = ("sdpo", "best-of-k", "multi-turn")
Method = Literal["sdpo", "best-of-k", "multi-turn"]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class SearchOptions:
    """How one problem is searched (shared by both commands)."""

    model: str = "smollm2-135m"
    """'smollm2-135m' (packaged), 'tiny-random', or a local Hugging Face model directory."""
    batch: int = 8
    """Attempts per round (the batch of one SDPO step)."""
    budget: int = 32
    """Attempts in all; the search stops without a solution when they are spent."""
    lr: float = 1e-5
    """AdamW learning rate of the test-time SDPO steps (constant, no warm-up)."""
    teacher: Literal["ema", "live", "frozen", "trust_region"] = "ema"
    tau: float = 0.05
    """EMA rate (teacher=ema) or mixing coefficient (teacher=trust_region)."""
    alpha: float = 1.0
    """0: forward KL, 1: reverse KL (default), else generalized JSD."""
    topk: int | None = 20
    """The student's top-k support of the divergence (None: full vocabulary)."""
    adv_clip: float | None = 5.0
    """Clamp of the per-token SDPO advantages (needs alpha=1 and topk; None: off)."""
    max_new_tokens: int = 48
    temperature: float = 1.0
    history: int = 4
    """multi-turn: failed attempts (each with its feedback) kept in a conversation."""
    feedback: Literal["format", "hint", "answer"] = "hint"
    """Feedback level of the built-in direct-answer tasks (arithmetic, string)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    env_workers: int = 2
    env_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("batch", "budget", "history"):
            _positive_int(name, getattr(self, name))
        self.train_config()  # checks lr, tau, alpha, topk, sampling, ... with the trainer's messages

    def train_config(self) -> TrainConfig:
        """The trainer settings of the SDPO steps: one prompt, `batch` rollouts, one micro-batch."""
        return TrainConfig(
            model=self.model, teacher=self.teacher, tau=self.tau, device=self.device,
            prompts_per_step=1, rollouts_per_prompt=self.batch, micro_batch_size=self.batch,
            generation_batch_size=max(self.batch, 64), env_workers=self.env_workers, env_timeout_s=self.env_timeout_s,
            sampling=SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature),
            optim=OptimOptions(lr=self.lr, warmup_steps=0),
            loss=LossConfig(alpha=self.alpha, topk=self.topk, adv_clip=self.adv_clip))


@dataclass
class TTSDConfig(SearchOptions):
    """Search a solution to one problem with test-time self-distillation (SDPO) or a baseline."""

    method: Method = "sdpo"
    task: str = "arithmetic"
    """A built-in task ('arithmetic', 'string', 'code'), 'humaneval', or 'code:FILE.jsonl' / 'math:FILE.jsonl'."""
    task_options: dict[str, str] = field(default_factory=dict)
    """Knobs of a built-in task generator as KEY VALUE pairs, e.g. `--task-options digits 2 ops +`."""
    split: Literal["train", "heldout"] = "heldout"
    index: int = 0
    """Which problem of the task's split (0-based)."""
    problem_file: Path | None = None
    """A JSONL file to take the problem from instead of the task (see `line`, `kind`)."""
    line: int = 0
    """Problem number in `problem_file` (0-based, blank lines skipped)."""
    kind: Literal["answer", "code", "math"] = "answer"
    """Schema of `problem_file`: built-in direct answer {prompt, answer, kind}, code, or math."""
    seed: int = 0
    output_dir: Path = Path("runs/ttsd")
    """Gets solution.json (the outcome and the discovered solution) and rounds.jsonl (one line per round)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index < 0 or self.line < 0:
            raise ValueError(f"index and line must be >= 0, got {self.index}, {self.line}")


@dataclass
class ExperimentConfig(SearchOptions):
    """discovery@k of every method over seeds x problems of a task: a table, JSON and a PNG curve."""

    methods: tuple[Method, ...] = METHODS
    task: str = "arithmetic"
    task_options: dict[str, str] = field(default_factory=dict)
    split: Literal["train", "heldout"] = "heldout"
    indices: tuple[int, ...] = ()
    """Problems of the split to search (0-based); empty: the first `problems`."""
    problems: int = 8
    seeds: int = 2
    """Seeds 0..seeds-1 per problem; every method sees the same seeds."""
    output: Path = Path("benchmarks/results/ttsd_discovery")
    """Writes OUTPUT.json (table and runs), OUTPUT.png (curves) and OUTPUT.runs.jsonl (progress: runs
    already there are reused, so an interrupted experiment continues where it stopped)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("problems", self.problems)
        _positive_int("seeds", self.seeds)
        if not self.methods or set(self.methods) - set(METHODS):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods!r}")
        if any(i < 0 for i in self.indices):
            raise ValueError(f"indices must be >= 0, got {self.indices!r}")

    def problem_indices(self) -> list[int]:
        return list(self.indices) if self.indices else list(range(self.problems))
