"""Command line: `sdpo-fast train | eval | preflight | ttsd | ttsd-experiment | bench ...`.

Each command takes a typed config (dataclass) whose defaults can be replaced by a YAML file given with
`--config FILE` and overridden by flags (`sdpo-fast COMMAND --help` lists them). A bad value, model,
task or output directory stops the command with one line naming it (exit 2) before any model is loaded.
A command is a config class (its docstring's first line is the command's help) and a function running it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
from pathlib import Path
from typing import Callable

import tyro

from sdpo_fast.train.config import EvalConfig, TrainConfig, load_yaml
from sdpo_fast.ttsd.config import ExperimentConfig, TTSDConfig

USAGE_ERROR = 2


class UsageError(SystemExit):
    """A bad input found before any work started: prints its one line to stderr when raised; exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(USAGE_ERROR)
        self.message = message
        print(f"{prog}: error: {message}", file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def _train(cfg: TrainConfig) -> None:
    from sdpo_fast.train.checks import check_run

    _checked("sdpo-fast train", check_run, cfg)  # before torch and the model load
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
    from sdpo_fast.models import check_model
    from sdpo_fast.train.data import check_task

    _checked("sdpo-fast eval", check_model, cfg.model)
    _checked("sdpo-fast eval", check_task, cfg.task, cfg.task_options, cfg.data)
    import torch

    from sdpo_fast.envs import BatchEvaluator
    from sdpo_fast.models import load_model, load_tokenizer
    from sdpo_fast.train.data import load_task
    from sdpo_fast.train.evaluate import heldout_correct

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if cfg.device == "auto" else cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, seed=cfg.seed).to(device)
    task = load_task(cfg.task, seed=cfg.seed, heldout_size=cfg.problems, options=cfg.task_options, data=cfg.data)
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


# `sdpo-fast bench`: op, scoring, step and algorithm-layer benchmarks on this device (sdpo_fast/bench/).
from sdpo_fast.bench.config import BenchConfig  # noqa: E402  (dataclasses only; the benchmarks load lazily)


def _bench(cfg: BenchConfig) -> None:
    from sdpo_fast.bench.run import run_bench

    run_bench(cfg)


COMMANDS["bench"] = (BenchConfig, _bench)


def _checked(prog: str, check: Callable, *args) -> None:
    """Run a pre-flight check; its ValueError becomes a UsageError (one line, exit 2)."""
    try:
        check(*args)
    except ValueError as exc:
        raise UsageError(prog, str(exc)) from None


class PreflightConfig(TrainConfig):
    """Self-teacher diagnostics on one sampled batch, no training: is this model/task in SDPO's regime?

    Takes the options of `sdpo-fast train` (sdpo_fast/train/preflight.py); nothing is written.
    """


def _preflight(cfg: TrainConfig) -> None:
    from sdpo_fast.models import check_model
    from sdpo_fast.train.data import check_task

    _checked("sdpo-fast preflight", check_model, cfg.model)  # before torch and the model load
    _checked("sdpo-fast preflight", check_task, cfg.task, cfg.task_options, cfg.data)
    from sdpo_fast.train.preflight import print_report, run_preflight

    print_report(cfg, run_preflight(cfg))


COMMANDS["preflight"] = (PreflightConfig, _preflight)


def parse(cls: type, args: list[str], prog: str):
    """Build `cls` from `--config FILE` (optional) and flags; a bad file or value raises UsageError (a SystemExit
    with status 2, its one line printed).

    For `train --resume` without `--config`, the run's saved output_dir/config.yaml gives the defaults, so
    the run continues as it was configured; flags given with --resume override it.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(args)
    config = known.config
    if cls is TrainConfig and config is None:
        peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        peek.add_argument("--output-dir", "--output_dir", type=Path, default=TrainConfig.output_dir)
        peek.add_argument("--resume", action="store_true")
        run, _ = peek.parse_known_args(rest)
        if run.resume and (run.output_dir / "config.yaml").is_file():
            config = run.output_dir / "config.yaml"
    try:
        default = load_yaml(cls, config) if config else cls()
        description = (f"{(cls.__doc__ or '').strip()}\n\n--config FILE: a YAML file of defaults (nested mappings for "
                       f"the dotted groups); flags override it.")
        with _value_errors_in_one_line(prog):
            return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)
    except ValueError as exc:
        raise UsageError(prog, str(exc)) from None


def _value_errors_in_one_line(prog: str):
    """While tyro parses: a value that a config's own checks refuse (tyro's "instantiation failure") becomes a
    UsageError, printed as one line like every other bad input; tyro keeps reporting unknown flags and
    invalid choices itself. Uses tyro's parse-error hook (`tyro._errors.on_parse_error`) when it has one."""
    from tyro import _errors

    def hook(event) -> None:
        if isinstance(event, getattr(_errors, "InstantiationFailure", ())):
            flags = getattr(getattr(getattr(event, "argument", None), "lowered", None), "name_or_flags", ())
            raise UsageError(prog, f"{flags[0]}: {event.message}" if flags else event.message)

    register = getattr(_errors, "on_parse_error", None)
    return register(hook) if register is not None else contextlib.nullcontext()


def usage() -> str:
    """The top-level help: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: sdpo-fast COMMAND [--config FILE] [options]   (sdpo-fast COMMAND --help lists the options)",
             "", "commands:"]
    for name, (cls, _) in COMMANDS.items():
        first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        line = first.split('; ')[0].split(': ')[0]
        if line.count("(") > line.count(")"):  # a parenthesis cut open above: leave it out
            line = line[:line.rindex("(")]
        lines.append(f"  {name:<{width}}  {line.strip().rstrip('.')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else USAGE_ERROR)
    if argv[0] not in COMMANDS:
        print(f"sdpo-fast: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)}; sdpo-fast --help)",
              file=sys.stderr)
        raise SystemExit(USAGE_ERROR)
    prog = f"sdpo-fast {argv[0]}"
    cls, run = COMMANDS[argv[0]]
    try:
        cfg = parse(cls, argv[1:], prog=prog)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(cfg)
    except OSError as exc:  # a full disk, a read-only directory, ...: what failed and where, in one line
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        resume = " (continue from the last checkpoint with --resume)" if argv[0] == "train" else ""
        print(f"{prog}: interrupted{resume}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
