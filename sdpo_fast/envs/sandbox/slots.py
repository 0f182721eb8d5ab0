"""Sandbox uids: one per evaluator process, from a machine-wide pool of slots held with file locks,
and the sweep that kills whatever a uid still runs (and removes its runs' memory cgroups).

Sandbox uids are UID_BASE + slot, far above the ranges distributions give to people and services.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import time
from pathlib import Path

from sdpo_fast.envs.sandbox import cgroup
from sdpo_fast.envs.sandbox.limits import SandboxUnavailable

UID_BASE = 2_000_000_000
UID_SLOTS = 4096
SLOT_DIR = Path(tempfile.gettempdir()) / "sdpo_fast-sandbox-slots"

_claimed: dict[int, tuple[int, int]] = {}  # pid -> (slot fd, uid): a forked child must claim its own


def claim_uid() -> int:
    """A sandbox uid no other live evaluator process uses (an exclusive lock on a slot file)."""
    if os.getpid() in _claimed:
        return _claimed[os.getpid()][1]
    SLOT_DIR.mkdir(mode=0o700, exist_ok=True)
    for slot in range(UID_SLOTS):
        fd = os.open(SLOT_DIR / str(slot), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        uid = UID_BASE + slot
        sweep_uid(uid)  # leftovers of an evaluator that died while holding this slot
        cgroup.remove_runs_of(uid)
        _claimed[os.getpid()] = (fd, uid)
        return uid
    raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uid slots in {SLOT_DIR} are in use")


def sweep_abandoned_slots() -> int:
    """Kill what is left under the uid of every slot whose evaluator process died (its lock is free),
    e.g. a worker stopped by a timeout in the middle of a run. Returns how many slots were swept."""
    if os.geteuid() != 0 or not SLOT_DIR.is_dir():
        return 0
    swept = 0
    for path in SLOT_DIR.iterdir():
        if not path.name.isdigit():
            continue
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live evaluator holds it
        else:
            sweep_uid(UID_BASE + int(path.name))
            cgroup.remove_runs_of(UID_BASE + int(path.name))
            swept += 1
        finally:
            os.close(fd)
    return swept


def pids_of_uid(uid: int) -> list[int]:
    """Processes (zombies included) whose /proc entry belongs to `uid`. A live process can hide from
    this (by making itself non-dumpable) but not from `kill_uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def task_count(uid: int) -> int:
    """Threads of all processes of `uid` (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in pids_of_uid(uid):
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: a forked helper becomes `uid` and calls kill(-1, SIGKILL), so the
    kernel signals them all in one pass and a fork racing with it fails."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def sweep_uid(uid: int, wait_s: float = 2.0) -> bool:
    """Kill every process of `uid` and wait (up to `wait_s`) until none is left; True when none is.
    Used for slots whose evaluator died: its runs' reapers died with it, so this waits on whoever
    reaps orphans here."""
    kill_uid(uid)
    end = time.monotonic() + wait_s
    while pids_of_uid(uid):
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True
