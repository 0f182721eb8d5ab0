"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, and the Hugging Face export.

Layout under the checkpoint root:
    step-00000012/    one complete checkpoint: DCP shards + per-rank extras (RNG states, data position)
    latest            text file naming the newest complete checkpoint directory

Every rank writes into a temporary directory; only when all ranks have finished does rank 0 rename it
to its final name and then replace `latest` (both atomic renames). A crash at any point leaves the
previous checkpoint complete and `latest` pointing at it. A failed write (a full disk, ...) removes the
temporary directory and raises `CheckpointError` saying what failed, where, and which checkpoint is still
the latest complete one. `Checkpointer` applies this to a trainer's `state_dict()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sdpo_fast.train.parallel import barrier, rank

LATEST = "latest"
RANK_STATE = "rank"  # the entry of a trainer's state dict that is this rank's own (saved per rank, not by DCP)


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the directory and the checkpoint that remains."""

    def __str__(self) -> str:
        return self.strerror  # the message already says what failed; no "[Errno N]" prefix


class Checkpointer:
    """The checkpoints of one run under `root`, the newest `keep` of them kept.

    Saves and loads a trainer's state dict (`Trainer.state_dict`): its RANK_STATE entry (step, random
    states) is this rank's own and goes to the rank's extras file; every other entry goes through DCP,
    sharded as the live model and optimizer are. Call both methods on every rank.
    """

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as the checkpoint of `step`; returns its directory."""
        shared = {k: v for k, v in state.items() if k != RANK_STATE}
        return save_checkpoint(self.root, step, shared, state[RANK_STATE], keep=self.keep)

    def load_latest(self, state: dict[str, Any]) -> Path:
        """Load the latest checkpoint into `state` in place (its tensors give the shapes and shards) and
        return the checkpoint's directory; ValueError when there is none."""
        path = latest_checkpoint(self.root)
        if path is None:
            raise ValueError(f"--resume: no checkpoint under {self.root}")
        state[RANK_STATE] = load_checkpoint(path, {k: v for k, v in state.items() if k != RANK_STATE})
        return path


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every save/load without a process group that it assumes one process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _save_error(exc: BaseException, root: Path, final: Path) -> CheckpointError:
    """One readable error for a failed save: DCP wraps each rank's exception, torch.save reports a full disk
    as a RuntimeError of its zip writer."""
    causes = [e for e, _ in exc.failures.values()] if isinstance(exc, CheckpointException) else [exc]
    codes = [getattr(e, "errno", None) for e in causes]
    full = errno.ENOSPC in codes or any("unexpected pos" in str(e) for e in causes)
    reason = "the disk is full" if full else "; ".join(f"{type(e).__name__}: {e}" for e in causes)
    latest = latest_checkpoint(root)
    return CheckpointError(errno.ENOSPC if full else next((c for c in codes if c), errno.EIO),
                           f"saving checkpoint {final.name} to {root} failed ({reason}); its partial files were "
                           f"removed; the latest complete checkpoint is {latest if latest is not None else 'none'}")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: Path, step: int, state: dict[str, Any], extras: dict[str, Any], keep: int = 2) -> Path:
    """Save DCP `state` (model/optimizer/teacher state dicts) and this rank's `extras`; returns the directory.

    Call on every rank. `keep` complete checkpoints are kept; older ones are removed.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash
    barrier()
    try:
        with _quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(extras, tmp / f"extras-rank{rank()}.pt")
    except (OSError, RuntimeError, CheckpointException) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(exc, root, final) from None
    barrier()
    if rank() == 0:
        _publish(root, tmp, final)
        _prune(root, step, keep)
    barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place, then point `latest` at it."""
    trash = root / f".old-{final.name}"
    if final.exists():  # re-saving a step: swap the old copy out (latest_checkpoint covers the gap)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    _write_latest(root, final.name)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`; drop later ones (an abandoned timeline)."""
    steps = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))
    doomed = [s for s in steps if s > step] + [s for s in steps if s <= step][:-max(keep, 1)]
    for s in doomed:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest `step-*` directory (all are complete), else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        return root / pointer.read_text().strip()
    steps = sorted(root.glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load DCP shards into `state` in place and return this rank's extras."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    extras_file = path / f"extras-rank{rank()}.pt"
    if not extras_file.exists():
        raise FileNotFoundError(f"{extras_file} missing: resume with the world size the checkpoint was saved with")
    return torch.load(extras_file, weights_only=False)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def export_model(lm: torch.nn.Module, tokenizer, final: Path) -> Path:
    """`lm` (FSDP2-sharded or not) and its tokenizer as a Hugging Face directory `final`: gathered on every
    rank, written by rank 0 into a temporary directory beside it and renamed into place."""
    final = Path(final)
    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=full)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final
