"""The jail: what runs between fork and exec of each sandboxed program.

`Sandbox` starts the program through `subprocess.Popen(preexec_fn=partial(enter, plan))`. The forked
child (the *supervisor*) makes the run's namespaces and, where it can, forks again:

    evaluator
      supervisor   outside the run's PID namespace; waits, then exits the way the program did
        init       PID 1 of the run's PID namespace ("pidns"): mounts the file system, reaps orphans
          program  the sandbox runner, then the model's code

When the init exits, the kernel kills and reaps everything else in its PID namespace, so nothing the
program started outlives the run and no reaping depends on the machine's PID 1. Without a PID
namespace but with a sandbox uid, the supervisor is a child subreaper ("subreaper"): orphans become its
children; when the program ends it kills the uid and reaps all of them. Without either (unprivileged
and no user namespaces) the program is the supervisor's own process, as a plain fork and exec.

The supervisor and init are copies of the evaluator and stay trusted: they close every file
descriptor they inherited, are not dumpable, and are invisible to the program (another PID namespace,
or another uid behind `hidepid`).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct
from dataclasses import dataclass

from sdpo_fast.envs.sandbox import cgroup, seccomp
from sdpo_fast.envs.sandbox.limits import Limits
from sdpo_fast.envs.sandbox.slots import kill_uid, task_count

SOLUTION = "solution.py"
PRIVATE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
HIDDEN_MOUNTS = ("/sys/fs/cgroup",)  # counters of other cgroups (and of earlier runs)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _PR_SET_CHILD_SUBREAPER = 22, 2, 36
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
_PROC_OPTIONS = (b"hidepid=invisible,subset=pid", b"hidepid=2", b"")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Plan:
    """Everything the jail needs, fixed in the evaluator before the fork."""

    isolation: tuple[str, ...]
    uid: int | None             # sandbox uid ("uid"), else None
    unshare_flags: int          # CLONE_NEW* of the run's namespaces (CLONE_NEWUSER first, if set)
    workdir: str
    source: str
    limits: Limits
    cgroup: str | None          # the run's memory cgroup directory
    report_fd: int | None       # where the supervisor writes the init's pid (pid namespace only)

    @property
    def pidns(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWPID)

    @property
    def supervised(self) -> bool:
        """The supervisor forks (init or program) instead of becoming the program."""
        return self.pidns or self.uid is not None


def enter(plan: Plan) -> None:
    """preexec_fn: returns only in the process that goes on to exec the program."""
    procs_fd = cgroup.open_procs(plan.cgroup) if plan.cgroup else None  # before /sys/fs/cgroup is hidden
    if not plan.supervised:
        make_namespaces(plan.unshare_flags)
        prepare_files(plan)
        become_program(plan, procs_fd)
        return
    _die_with_parent()
    make_namespaces(plan.unshare_flags)
    _prctl(_PR_SET_DUMPABLE, 0)  # after the user namespace's id maps, which a non-dumpable process cannot write
    if not plan.pidns:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    status_r, status_w = os.pipe()
    first = os.fork()
    if first:
        _supervise(plan, first, status_r, status_w)  # never returns
    os.close(status_r)
    _die_with_parent()
    prepare_files(plan)  # before the init forks: its program shares the mounts
    if plan.pidns:
        program = os.fork()
        if program:
            _init(program, status_w)  # never returns
    os.close(status_w)
    become_program(plan, procs_fd)


def _supervise(plan: Plan, child: int, status_r: int, status_w: int) -> None:
    """The supervisor: report the init's pid, wait for the run to end, exit as the program did."""
    try:
        os.close(status_w)
        if plan.pidns and plan.report_fd is not None:
            os.write(plan.report_fd, struct.pack("i", child))
        _close_fds_except(status_r)
        if plan.pidns:
            os.waitpid(child, 0)
            status = os.read(status_r, 4)
            wait_status = struct.unpack("i", status)[0] if len(status) == 4 else signal.SIGKILL
        else:
            wait_status = _reap_all(child, plan.uid)
        _exit_as(wait_status)
    finally:
        os._exit(255)


def _init(program: int, status_w: int) -> None:
    """PID 1 of the run: reap every process until the program ends, pass its status on, exit (which
    makes the kernel kill the rest of the namespace)."""
    try:
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        _close_fds_except(status_w)
        while True:
            pid, wait_status = os.waitpid(-1, 0)
            if pid == program:
                os.write(status_w, struct.pack("i", wait_status))
                break
    finally:
        os._exit(0)


def _reap_all(program: int, uid: int) -> int:
    """Subreaper: reap children until the program ends, kill the uid, reap everything left."""
    program_status = signal.SIGKILL
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return program_status
        if pid == program:
            program_status = wait_status
            kill_uid(uid)


def _exit_as(wait_status: int) -> None:
    """Exit with the program's code, or die of the signal that killed it (without a core file)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 255)


def _close_fds_except(keep: int) -> None:
    os.closerange(0, keep)
    os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _die_with_parent() -> None:
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


# -- steps ------------------------------------------------------------------------------------------------

def make_namespaces(flags: int) -> None:
    """The run's namespaces; a user namespace first (unprivileged), mapping our ids to themselves."""
    if flags & CLONE_NEWUSER:
        unshare(CLONE_NEWUSER)
        map_own_ids()
    if flags & ~CLONE_NEWUSER:
        unshare(flags & ~CLONE_NEWUSER)


def prepare_files(plan: Plan) -> None:
    """The run's view of the file system (in its mount namespace): all read-only but fresh small
    tmpfs mounts over the world-writable directories, a /proc of the run's PID namespace only, and
    nothing under /sys/fs/cgroup."""
    iso = plan.isolation
    if "private_tmp" not in iso:
        return
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    if "readonly_fs" in iso:
        readonly_root()
    private_mounts(plan.limits.file_mb)
    if "private_proc" in iso:
        private_proc()
        for path in HIDDEN_MOUNTS:
            if os.path.isdir(path):
                _mount_tmpfs(path, 0, _MS_RDONLY)


def become_program(plan: Plan, procs_fd: int | None) -> None:
    """The last steps before exec: files, limits, cgroup, then fewer privileges.
    The address-space limit comes last: this process is still a copy of the (possibly large) evaluator."""
    limits = plan.limits
    os.chdir(plan.workdir)
    with open(SOLUTION, "w", encoding="utf-8") as f:
        f.write(plan.source)
    cpu = max(1, int(limits.cpu_s + 0.999))
    nproc = limits.processes
    if plan.uid is None and "userns" not in plan.isolation:
        nproc += task_count(os.getuid())  # the caller's uid is shared: allow only `processes` more
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2),
                       (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
                       (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_NPROC, (nproc, nproc))):
        resource.setrlimit(res, value)
    if procs_fd is not None:  # into the run's memory cgroup (its children follow)
        os.write(procs_fd, b"0")
        os.close(procs_fd)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if "seccomp" in plan.isolation:
        install_seccomp()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def map_own_ids() -> None:
    """In a fresh user namespace: map our own uid and gid to themselves (no other ids exist there)."""
    uid, gid = os.getuid(), os.getgid()
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def readonly_root() -> None:
    """Make every mount of this mount namespace read-only (mount_setattr, Linux 5.12+): no file
    outside the private tmpfs mounts can be written, nor an access time changed."""
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, attr, len(attr)),
           "mount_setattr(/, RDONLY)")


def private_mounts(size_mb: int) -> None:
    """A small fresh tmpfs over each world-writable directory."""
    for path in PRIVATE_MOUNTS:
        if os.path.isdir(path):
            _mount_tmpfs(path, size_mb, 0)


def private_proc() -> None:
    """A /proc of this PID namespace only; where the kernel allows, without other users' processes
    and without the system-wide files (load, memory, IPC and key tables)."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for options in _PROC_OPTIONS:
        if _libc.mount(b"proc", b"/proc", b"proc", flags, options or None) == 0:
            return
    _check(-1, "mount proc")


def install_seccomp() -> None:
    _code, fprog = seccomp.filter_program()
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def _mount_tmpfs(path: str, size_mb: int, flags: int) -> None:
    options = f"size={size_mb}m,mode=1777" if size_mb else "size=4k,mode=755"
    _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | flags, options.encode()),
           f"mount tmpfs {path}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
