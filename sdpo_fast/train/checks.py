"""Checks of a run that need no model: run before the model loads, so a bad input fails in a second with a
one-line message instead of after minutes (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

from sdpo_fast.models import check_model
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.data import check_task

# What a run writes into its output_dir; --overwrite deletes exactly these.
RUN_FILES = ("config.yaml", "config_changes.jsonl", "metrics.jsonl", "curves.png", "checkpoints", "model",
             ".model.tmp", "tensorboard")


def check_run(cfg: TrainConfig, *, task: bool = True) -> None:
    """Raise a ValueError naming the option unless the model, the task (`task=False`: the caller supplies
    its own) and the output directory can serve this run."""
    check_model(cfg.model)
    if task:
        check_task(cfg.task, cfg.task_options, cfg.data)
    check_output_dir(cfg)


def check_output_dir(cfg: TrainConfig) -> None:
    """output_dir is a writable directory (or can be made one); --resume finds a checkpoint there; a new run
    never silently replaces a previous one (--overwrite says so explicitly)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {out}: {probe} is not a writable directory")
    if cfg.resume:
        if not has_checkpoint(out / "checkpoints"):
            raise ValueError(f"--resume: no checkpoint under {out / 'checkpoints'} (run without --resume to start "
                             f"a new run)")
    elif out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"output_dir {out} is not empty (a previous run?): continue it with --resume, or start "
                         f"anew with --overwrite (deletes its {', '.join(RUN_FILES[:5])}, ...), or choose another "
                         f"--output-dir")


def has_checkpoint(root: Path) -> bool:
    """Whether `root` holds a complete checkpoint (see `checkpoint.latest_checkpoint`; this one needs no torch)."""
    return Path(root).is_dir() and any(p.is_dir() for p in Path(root).glob("step-*"))
