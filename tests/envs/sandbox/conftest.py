"""Shared by the sandbox tests: the machine's isolation support, and the check that no run left anything
behind (processes, System V objects, keys, files, run cgroups of the evaluator's sandbox uid)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sdpo_fast.envs.sandbox import isolation_support
from sdpo_fast.envs.sandbox.slots import pids_of_uid

ROOT = os.geteuid() == 0
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@pytest.fixture(scope="module")
def support():
    return isolation_support()


def sysv_objects(uid: int) -> Iterator[tuple[str, list[str]]]:
    """(kind, row fields) of each System V shm / msg / sem object owned by `uid`."""
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            header, *rows = f.read().splitlines()
        uid_col = header.split().index("uid")
        yield from ((kind, row.split()) for row in rows if int(row.split()[uid_col]) == uid)


def sandbox_leftovers(uid: int) -> list[str]:
    """Anything on the host that belongs to sandbox uid `uid` (this evaluator's; other evaluators on
    the machine have their own): processes, System V objects, keys, files, and run cgroups."""
    found = [f"sysv {kind}: {fields}" for kind, fields in sysv_objects(uid)]
    with open("/proc/key-users") as f:
        found += [f"keys: {line.strip()}" for line in f if int(line.split(":")[0]) == uid]
    for folder in WRITABLE_DIRS:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                try:
                    if os.lstat(os.path.join(folder, name)).st_uid == uid:
                        found.append(f"file {folder}/{name}")
                except FileNotFoundError:
                    continue
    found += [f"process {pid}" for pid in pids_of_uid(uid)]
    memcg = isolation_support().memcg
    if memcg is not None:
        found += [f"cgroup {name}" for name in os.listdir(memcg.parent) if name.startswith(f"sdpo-run-{uid}-")]
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(support):
    yield
    if support.uid is not None:  # without one, the runs' leftovers cannot be told from the host's
        assert sandbox_leftovers(support.uid) == []
