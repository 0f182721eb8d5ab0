"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under the checkpoint root:
    step-00000012/    one complete checkpoint: DCP shards + per-rank extras (RNG states, data position)
    latest            text file naming the newest complete checkpoint directory

Every rank writes into a temporary directory; only when all ranks have finished does rank 0 rename it
to its final name and then replace `latest` (both atomic renames). A crash at any point leaves the
previous checkpoint complete and `latest` pointing at it. A failed write (a full disk, ...) removes the
temporary directory and raises `CheckpointError` saying what failed, where, and which checkpoint is still
the latest complete one.
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

LATEST = "latest"


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the directory and the checkpoint that remains."""


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every save/load without a process group that it assumes one process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash
    _barrier()
    try:
        with _quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(extras, tmp / f"extras-rank{_rank()}.pt")
    except (OSError, RuntimeError, CheckpointException) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(exc, root, final) from None
    _barrier()
    if _rank() == 0:
        _publish(root, tmp, final)
        _prune(root, step, keep)
    _barrier()
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
    extras_file = path / f"extras-rank{_rank()}.pt"
    if not extras_file.exists():
        raise FileNotFoundError(f"{extras_file} missing: resume with the world size the checkpoint was saved with")
    return torch.load(extras_file, weights_only=False)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)
