"""Command line: `sdpo-fast train | eval | ttsd | ttsd-experiment ...`.

Each command takes a typed config (dataclass) whose defaults can be replaced by a YAML file given with
`--config FILE` and overridden by flags (`sdpo-fast train --help` lists them). A bad value stops the
command with a message naming it before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tyro

from sdpo_fast.train.config import TrainConfig, load_yaml
from sdpo_fast.ttsd.config import ExperimentConfig, TTSDConfig


@dataclass
class EvalConfig:
    """Held-out accuracy of a model on a task (greedy decoding; correct = every test passes)."""

    model: str = "smollm2-135m"
    """'smollm2-135m', 'tiny-random', or a Hugging Face directory (e.g. a run's output_dir/model)."""
    task: str = "arithmetic"
    problems: int = 64
    max_new_tokens: int = 64
    seed: int = 0
    device: str = "auto"


def _train(cfg: TrainConfig) -> None:
    from sdpo_fast.train.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.rt.is_main:
        before = summary.get("eval/accuracy_before")
        after = summary.get("eval/accuracy")
        if before is not None and after is not None:
            print(f"held-out accuracy: {before:.3f} -> {after:.3f} ({cfg.eval.problems} problems, greedy)")
        model = f"  model: {cfg.output_dir / 'model'}" if cfg.export else ""
        print(f"metrics: {cfg.output_dir / 'metrics.jsonl'}  plot: {cfg.output_dir / 'curves.png'}{model}")


def _eval(cfg: EvalConfig) -> None:
    import torch

    from sdpo_fast.envs import BatchEvaluator
    from sdpo_fast.models import load_model, load_tokenizer
    from sdpo_fast.train.data import load_task
    from sdpo_fast.train.evaluate import heldout_correct

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if cfg.device == "auto" else cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, seed=cfg.seed).to(device)
    task = load_task(cfg.task, seed=cfg.seed, heldout_size=cfg.problems)
    problems = task.heldout[: cfg.problems]
    with BatchEvaluator(task.env) as evaluator:
        correct = heldout_correct(model, tokenizer, task, problems, evaluator, max_new_tokens=cfg.max_new_tokens)
    print(f"held-out accuracy of {cfg.model} on {cfg.task}: {correct}/{len(problems)} = "
          f"{correct / max(len(problems), 1):.3f}")


def _ttsd(cfg: TTSDConfig) -> None:
    from sdpo_fast.ttsd import run_ttsd

    result = run_ttsd(cfg)
    if result.solved:
        print(f"{cfg.method}: solved after {result.attempts} attempts ({result.rounds} rounds of {cfg.batch}, "
              f"{result.seconds:.0f} s)")
    else:
        print(f"{cfg.method}: not solved within the budget of {cfg.budget} attempts ({result.seconds:.0f} s)")
    print(f"solution: {cfg.output_dir / 'solution.json'}  rounds: {cfg.output_dir / 'rounds.jsonl'}")


def _ttsd_experiment(cfg: ExperimentConfig) -> None:
    from sdpo_fast.ttsd import run_experiment

    summary = run_experiment(cfg)
    print(f"discovery@k over {summary['runs_per_method']} runs per method (problems x seeds):")
    print(summary["table"])
    print(f"results: {cfg.output}.json  plot: {cfg.output}.png")


COMMANDS: dict[str, tuple[type, Callable]] = {"train": (TrainConfig, _train), "eval": (EvalConfig, _eval)}
COMMANDS.update({"ttsd": (TTSDConfig, _ttsd), "ttsd-experiment": (ExperimentConfig, _ttsd_experiment)})


# `sdpo-fast bench`: op, scoring and step benchmarks on this device (sdpo_fast/bench/).
from sdpo_fast.bench.config import BenchConfig  # noqa: E402  (dataclasses only; the benchmarks load lazily)


def _bench(cfg: BenchConfig) -> None:
    from sdpo_fast.bench.run import run_bench

    run_bench(cfg)


COMMANDS["bench"] = (BenchConfig, _bench)


# `sdpo-fast preflight`: self-teacher diagnostics of one sampled batch, no training (sdpo_fast/train/preflight.py).
def _preflight(cfg: TrainConfig) -> None:
    from sdpo_fast.train.preflight import print_report, run_preflight

    print_report(cfg, run_preflight(cfg))


COMMANDS["preflight"] = (TrainConfig, _preflight)


def parse(cls: type, args: list[str], prog: str):
    """Build `cls` from `--config FILE` (optional) and flags; exits with a message on a bad value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(args)
    try:
        default = load_yaml(cls, known.config) if known.config else cls()
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    return tyro.cli(cls, default=default, args=rest, prog=prog)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: sdpo-fast {{{names}}} [--config FILE] [options]   (sdpo-fast COMMAND --help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cls, run = COMMANDS[argv[0]]
    run(parse(cls, argv[1:], prog=f"sdpo-fast {argv[0]}"))


if __name__ == "__main__":
    main()
