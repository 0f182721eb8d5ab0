"""A run's output directory and the checks that need no model (torch-free).

The checks run before the model loads, so a bad input fails in a second with a one-line message instead of
after minutes; `record_config` writes the run's config into its directory once the checks have passed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from sdpo_fast.files import write_atomically
from sdpo_fast.models import check_model
from sdpo_fast.train.config import TrainConfig, from_dict, to_dict
from sdpo_fast.train.data import check_task

log = logging.getLogger(__name__)

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


def record_config(cfg: TrainConfig, step: int) -> None:
    """Write output_dir/config.yaml (what `--resume` restores). A new run with --overwrite first deletes the
    previous run's RUN_FILES; a resumed run (at `step`) whose settings changed appends the changes, with the
    step they apply from, to config_changes.jsonl."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    current = to_dict(dataclasses.replace(cfg, resume=False, overwrite=False))
    if cfg.resume and saved.is_file():
        before = _flatten(to_dict(from_dict(TrainConfig, yaml.safe_load(saved.read_text()) or {})))
        changed = {k: [before.get(k), v] for k, v in _flatten(current).items() if before.get(k) != v}
        if changed:
            log.info("resuming with changed settings: %s", changed)
            with open(out / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "changed": changed}) + "\n")
    write_atomically(saved, yaml.safe_dump(current, sort_keys=False))


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"loss.alpha": 0.5, ...} from nested mappings (option mappings such as task_options stay whole)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("task_options", "chat_template_kwargs"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
