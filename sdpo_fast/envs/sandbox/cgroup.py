"""A memory cgroup per run: caps everything the run's processes hold, not only their address space.

RLIMIT_AS does not count memory outside a process's mappings: memfd and tmpfs pages written with
write(), pipe buffers, System V shared memory. A cgroup counts them all and its limit holds for the
run as a whole. cgroup v2 (`memory.max`, swap off with `memory.swap.max`) where the memory controller
is there and writable, else cgroup v1's memory controller (`memory.limit_in_bytes`, `memory.memsw.*`
where swap is accounted). Each run gets a fresh cgroup, removed after the run: nothing a run leaves
in its counters (peak usage, failures) is seen by the next one.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "sdpo-run-"


@dataclass(frozen=True)
class MemoryCgroups:
    """Where run cgroups are made (`parent`) and which cgroup version the files follow."""

    parent: str
    version: int

    def create(self, memory_mb: int, owner: int) -> str:
        """A new cgroup limited to `memory_mb` (no swap) for a run of sandbox uid `owner`; returns its
        directory."""
        path = os.path.join(self.parent, f"{PREFIX}{owner}-{uuid.uuid4().hex[:16]}")
        os.mkdir(path, 0o755)
        limit = str(memory_mb << 20)
        try:
            if self.version == 2:
                _write(path, "memory.max", limit)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    _write(path, "memory.swap.max", "0")
            else:
                _write(path, "memory.limit_in_bytes", limit)
                if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                    _write(path, "memory.memsw.limit_in_bytes", limit)
        except OSError:
            remove(path)
            raise
        return path

    def oom_kills(self, path: str) -> int:
        """How many processes of the cgroup the kernel killed for memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            pass
        return 0


def open_procs(path: str) -> int:
    """A descriptor on the cgroup's process list: writing "0" moves the writer into the cgroup."""
    return os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)


def remove(path: str, wait_s: float = 1.0) -> bool:
    """Remove an empty cgroup (retrying while the kernel finishes the exit of its last processes)."""
    end = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > end:
                return False
            time.sleep(0.002)


def remove_runs_of(owner: int) -> None:
    """Remove the run cgroups left by sandbox uid `owner` (an evaluator that died during a run)."""
    found = find_memory_cgroups()
    if found is not None:
        for name in os.listdir(found.parent):
            if name.startswith(f"{PREFIX}{owner}-"):
                remove(os.path.join(found.parent, name))


def find_memory_cgroups() -> MemoryCgroups | None:
    """A writable place for run cgroups with the memory controller, or None. Tries cgroup v2 (this
    process's cgroup, then the hierarchy's root), then cgroup v1's memory hierarchy."""
    own = _own_cgroups()
    if "" in own:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            if (base / "cgroup.controllers").exists():
                for parent in (base / own[""].lstrip("/"), base):
                    if _v2_memory_ready(parent):
                        return MemoryCgroups(str(parent), 2)
                break
    if "memory" in own and (CGROUP_ROOT / "memory").is_dir():
        parent = CGROUP_ROOT / "memory" / own["memory"].lstrip("/")
        if (parent / "memory.limit_in_bytes").exists() and os.access(parent, os.W_OK):
            return MemoryCgroups(str(parent), 1)
    return None


def _v2_memory_ready(parent: Path) -> bool:
    """Children of `parent` get the memory controller (enabling it if allowed) and we may write here."""
    try:
        if "memory" not in (parent / "cgroup.controllers").read_text().split():
            return False
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            _write(str(parent), "cgroup.subtree_control", "+memory")
        return os.access(parent, os.W_OK)
    except OSError:
        return False


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller ("memory") and for v2 (key "")."""
    found = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(","):
                    found[name] = path
    except OSError:
        pass
    return found


def _write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)
