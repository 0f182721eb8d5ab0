"""What isolation this machine allows, probed once per evaluator process.

A forked child tries each step the jail takes (namespaces, mounts, uid switch, seccomp) and reports
which worked; the memory cgroup is tried from the evaluator; then a real run checks that an
interpreter starts inside the whole jail. `isolation_support().isolation` names what is applied:

    rlimits       always
    uid           a dedicated unprivileged uid (evaluator is root)
    userns        a user namespace (evaluator is not root), so the namespaces below can be made
    netns         no network
    ipcns         private System V IPC and POSIX message queues, gone with the run
    pidns         a PID namespace with its own init: reaps everything, kills everything at the end
    subreaper     (uid without pidns) the supervisor reaps and kills the run's orphans
    private_tmp   fresh tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock
    readonly_fs   every other mount read-only
    private_proc  a /proc of the run's PID namespace only (hidepid, no system-wide files)
    memcg         a memory cgroup per run (v1 or v2)
    seccomp       the syscall filter of `seccomp.py`
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass

from sdpo_fast.envs.sandbox import cgroup, jail, seccomp
from sdpo_fast.envs.sandbox.limits import Limits, SandboxUnavailable
from sdpo_fast.envs.sandbox.slots import claim_uid


@dataclass(frozen=True)
class Support:
    """The isolation this process can apply (see the module docstring)."""

    isolation: tuple[str, ...]
    uid: int | None                          # sandbox uid ("uid"), else None
    python: str                              # interpreter the sandbox runs
    unshare_flags: int                       # CLONE_NEW* flags of each run
    memcg: cgroup.MemoryCgroups | None = None  # where run cgroups are made ("memcg")

    @property
    def pidns(self) -> bool:
        return bool(self.unshare_flags & jail.CLONE_NEWPID)


def isolation_support() -> Support:
    """The isolation available to this process (probed once per process; raises SandboxUnavailable)."""
    return _cached_support(os.getpid())


@functools.lru_cache(maxsize=1)
def _cached_support(pid: int) -> Support:
    root = os.geteuid() == 0
    uid = claim_uid() if root else None
    seccomp.filter_program()  # built here, before any fork
    features = set(_probe_features(uid))
    if root and "uid" not in features:
        raise SandboxUnavailable(
            "running as root but cannot switch to an unprivileged uid; root ignores RLIMIT_NPROC, so "
            "untrusted code is not run (run the evaluator as an ordinary user instead)")
    memcg = _probe_memcg() if root else None
    if memcg:
        features.add("memcg")
    if "uid" in features and "pidns" not in features:
        features.add("subreaper")
    flags = 0
    for name, flag in (("userns", jail.CLONE_NEWUSER), ("netns", jail.CLONE_NEWNET),
                       ("ipcns", jail.CLONE_NEWIPC), ("pidns", jail.CLONE_NEWPID),
                       ("private_tmp", jail.CLONE_NEWNS)):
        if name in features:
            flags |= flag
    order = ("rlimits", "uid", "userns", "netns", "ipcns", "pidns", "subreaper", "private_tmp",
             "readonly_fs", "private_proc", "memcg", "seccomp")
    isolation = tuple(name for name in order if name in features or name == "rlimits")
    draft = Support(isolation, uid if "uid" in features else None, "", flags, memcg)
    for python in _python_candidates():
        trial = Support(isolation, draft.uid, python, flags, memcg)
        if _interpreter_works(trial):
            return trial
    raise SandboxUnavailable(
        "no Python interpreter can be executed by the sandbox user; install one outside private "
        f"directories (tried {_python_candidates()})")


def _python_candidates() -> list[str]:
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
             "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3", path="/usr/bin:/bin") or ""]
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p)))


def _interpreter_works(trial: Support) -> bool:
    from sdpo_fast.envs.sandbox.process import Sandbox  # the probe is a real run

    probe = "import json, math, re, collections, itertools\nprint('ok')"
    try:
        with Sandbox(probe, limits=Limits(wall_s=10.0), support=trial) as box:
            result = box.communicate("")
    except SandboxUnavailable:
        return False
    return result.returncode == 0 and result.stdout == "ok\n"


def _probe_memcg() -> cgroup.MemoryCgroups | None:
    """Where run cgroups can be made, checked by making one and moving a child into it."""
    found = cgroup.find_memory_cgroups()
    if found is None:
        return None
    try:
        path = found.create(64, os.getpid())
    except OSError:
        return None
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.write(cgroup.open_procs(path), b"0")
                os._exit(0)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        return found if status == 0 else None
    finally:
        cgroup.remove(path)


def _probe_features(uid: int | None) -> list[str]:
    """Fork a child that tries each isolation step; it reports which ones worked."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: try, report, exit without running any Python cleanup
        os.close(read_fd)
        worked: list[str] = []
        try:
            worked = _try_features(uid)
        finally:
            os.write(write_fd, json.dumps(worked).encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data or b"[]")


def _try(step) -> bool:
    try:
        step()
        return True
    except OSError:
        return False


def _try_features(uid: int | None) -> list[str]:
    worked = []
    if uid is None and _try(lambda: jail.make_namespaces(jail.CLONE_NEWUSER)):
        worked.append("userns")
    if uid is not None or worked:
        for flag, name in ((jail.CLONE_NEWNET, "netns"), (jail.CLONE_NEWIPC, "ipcns")):
            if _try(lambda: jail.unshare(flag)):
                worked.append(name)
        if _try(lambda: (jail.unshare(jail.CLONE_NEWNS), jail.private_mounts(1))):
            worked.append("private_tmp")
            if _try(jail.readonly_root):
                worked.append("readonly_fs")
        if _try(lambda: jail.unshare(jail.CLONE_NEWPID)):
            worked.append("pidns")
            if "private_tmp" in worked and _in_child(jail.private_proc):
                worked.append("private_proc")
    if uid is not None:  # irreversible for this child: after the namespaces
        if _try(lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid))):
            worked.append("uid")
    if seccomp.filter_program() is not None and _try(lambda: (jail._prctl(jail._PR_SET_NO_NEW_PRIVS, 1),
                                                               jail.install_seccomp())):
        worked.append("seccomp")
    return worked


def _in_child(step) -> bool:
    """Run `step` in a forked child (the first process of a new PID namespace); True if it worked."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _try(step) else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0
