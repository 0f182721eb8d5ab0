"""Run model-written Python in a separate, locked-down process.

Every run is a fresh process started by `Sandbox` (see `sandbox_runner.py` for what runs inside). Before
the interpreter starts, the forked child applies, as far as the machine allows:

- "uid": when the evaluator is root, a dedicated unprivileged uid (one per evaluator process, from a
  machine-wide pool of slots held with file locks); it cannot signal, trace or read the evaluator, and
  RLIMIT_NPROC, which root ignores, caps its process count. Without root the code keeps the caller's uid.
- "userns": without root, a new user namespace (own uid mapped to itself) so the two namespaces below
  can be made and RLIMIT_NPROC counts only the sandbox's own processes.
- "netns": a new network namespace with no interface up (no network at all).
- "private_tmp": a new mount namespace with small fresh tmpfs mounts over /tmp, /var/tmp, /dev/shm and
  /run/lock; the working directory is that /tmp, so nothing the code writes outlives it.
- "seccomp": a kernel filter that refuses socket() and io_uring_setup() with EACCES (sockets are refused
  even where no network namespace can be made).
- always: rlimits (CPU seconds, address space, processes, file size, open files, no core files), a new
  session, no new privileges, SIGKILL on the evaluator's death, a scrubbed environment, a wall-clock
  deadline and a cap on captured output.

After each run everything the code started is killed: all processes of the sandbox uid (with "uid"),
otherwise its process group. Running as root without a usable unprivileged uid is refused
(`SandboxUnavailable`): root ignores RLIMIT_NPROC, so one fork bomb could take the machine down.
`Sandbox.isolation` lists what was applied.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sdpo_fast.envs.sandbox_runner import decode, encode

RUNNER_SOURCE = (Path(__file__).with_name("sandbox_runner.py")).read_text()
SOLUTION = "solution.py"

# Sandbox uids are UID_BASE + slot; far above the ranges distributions give to people and services.
UID_BASE = 2_000_000_000
UID_SLOTS = 4096
_SLOT_DIR = Path(tempfile.gettempdir()) / "sdpo_fast-sandbox-slots"
_PRIVATE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 1, 38, 22, 2
# (audit arch, socket, io_uring_setup) per machine; other machines run without the seccomp filter.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


class SandboxUnavailable(RuntimeError):
    """This machine cannot run untrusted code safely (or no interpreter is usable by the sandbox)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed process (and, for processes/memory, of what it spawns)."""

    cpu_s: float = 2.0          # CPU seconds (RLIMIT_CPU; SIGKILL one second later)
    wall_s: float = 4.0         # wall-clock seconds for the whole run
    memory_mb: int = 512        # address space per process (RLIMIT_AS)
    processes: int = 8          # processes and threads of the sandbox uid (RLIMIT_NPROC)
    file_mb: int = 16           # largest file written (RLIMIT_FSIZE) and size of each private tmpfs
    output_bytes: int = 1 << 20  # stdout + stderr captured; more kills the run
    open_files: int = 64        # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """What happened to a finished sandboxed process (its output is untrusted text)."""

    returncode: int | None     # negative: killed by that signal; None: still running when we killed it
    stdout: str
    stderr: str
    timed_out: bool            # wall-clock deadline or CPU limit
    output_exceeded: bool
    wall_s: float


class Sandbox:
    """One sandboxed run of `source` (saved as solution.py) through `sandbox_runner.py` in `mode`.

    Use as a context manager: "stdio" mode through `communicate(stdin)`; "call" mode through `call(...)`,
    first `call(None)` (the load status), then once per function call. Leaving the context kills every
    process the run started. `support` is for probing only; by default `isolation_support()` is used.
    """

    def __init__(self, source: str, mode: str = "stdio", entry: str | None = None,
                 limits: Limits = Limits(), support: Support | None = None) -> None:
        if mode not in ("stdio", "call"):
            raise ValueError(f"mode must be 'stdio' or 'call', got {mode!r}")
        if (mode == "call") != bool(entry):
            raise ValueError("entry is required in 'call' mode and only there")
        self.source, self.mode, self.entry, self.limits = source, mode, entry, limits
        self.support = support or isolation_support()
        self.isolation = self.support.isolation
        self._out = {"stdout": bytearray(), "stderr": bytearray()}
        self._reply = bytearray()
        self.timed_out = self.output_exceeded = self._killed = False
        self._exited_at: float | None = None
        self._proc: subprocess.Popen | None = None
        self._workdir: str | None = None

    def __enter__(self) -> Sandbox:
        sup = self.support
        private = "private_tmp" in sup.isolation
        self._workdir = "/tmp" if private else tempfile.mkdtemp(prefix="sdpo-sandbox-")
        if sup.uid is not None and not private:
            os.chown(self._workdir, sup.uid, sup.uid)
        argv = [sup.python, "-S", "-s", "-c", RUNNER_SOURCE, self.mode]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self._workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        child_fds: tuple[int, ...] = ()
        if self.mode == "call":
            req_r, self._req_w = os.pipe()
            self._rep_r, rep_w = os.pipe()
            child_fds = (req_r, rep_w)
            argv += [self.entry, str(req_r), str(rep_w)]
        jail = functools.partial(_enter_jail, sup, self.limits, self._workdir, self.source)
        self._start = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if self.mode == "stdio" else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                start_new_session=True, preexec_fn=jail, pass_fds=child_fds)
        except (OSError, subprocess.SubprocessError) as exc:
            self._remove_workdir()
            if self.mode == "call":
                os.close(self._req_w)
                os.close(self._rep_r)
            raise SandboxUnavailable(f"could not start the sandboxed process: {exc}") from exc
        finally:
            for fd in child_fds:
                os.close(fd)
        self._sel = selectors.DefaultSelector()
        for name in ("stdout", "stderr"):
            fd = getattr(self._proc, name).fileno()
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_READ, name)
        if self.mode == "call":
            os.set_blocking(self._rep_r, False)
            self._sel.register(self._rep_r, selectors.EVENT_READ, "reply")
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything the run started and remove its files (idempotent)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            _kill_all(proc, self.support)
        finally:
            self._sel.close()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            if self.mode == "call":
                for fd in (self._req_w, self._rep_r):
                    os.close(fd)
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir and self._workdir != "/tmp":
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    def communicate(self, stdin: str) -> RunResult:
        """stdio mode: feed `stdin`, wait for the program to end (or the deadline), return what happened."""
        pending = memoryview(stdin.encode())
        fd = self._proc.stdin.fileno()
        if pending:
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_WRITE, "stdin")
        else:
            self._proc.stdin.close()
        while self._pump() and not self._ended({"stdout", "stderr"}):
            if pending and "stdin" in self._writable:
                try:
                    pending = pending[os.write(fd, pending):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    self._sel.unregister(fd)
                    self._proc.stdin.close()
        return self.result()

    def call(self, args: list | None, kwargs: dict | None = None) -> tuple[str, object]:
        """call mode: send a call (none for `args=None`) and return the reply, ("ok", value) or ("error", text).

        Raises `SandboxEnded` if the process ended, ran out of time or flooded its output first. Values
        are encoded with `sandbox_runner.encode` (plain data only; others raise UnsupportedValue).
        """
        if args is not None:
            message = {"args": encode(list(args)),
                       "kwargs": [[k, encode(v)] for k, v in (kwargs or {}).items()]}
            try:
                os.write(self._req_w, json.dumps(message).encode() + b"\n")
            except BrokenPipeError:
                raise SandboxEnded(self.result()) from None
        while b"\n" not in self._reply:
            if not self._pump() or self._ended({"reply"}):
                raise SandboxEnded(self.result())
        line, _, rest = bytes(self._reply).partition(b"\n")
        self._reply = bytearray(rest)
        try:  # the reply is untrusted: anything unreadable is the program's failure
            message = json.loads(line)
            if set(message) == {"ok"}:
                return "ok", decode(message["ok"])
            return "error", str(message["error"])
        except Exception as exc:
            return "error", f"the program sent an unreadable reply ({type(exc).__name__}: {exc})"[:300]

    def result(self) -> RunResult:
        """The run so far; waits briefly for the exit status of a process that is ending."""
        code = self._proc.poll()
        if code is None and not self._killed:
            try:
                code = self._proc.wait(timeout=max(0.0, min(0.2, self.deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        cpu_limit = not self._killed and code in (-signal.SIGXCPU, -signal.SIGKILL)
        return RunResult(
            returncode=code, stdout=self._out["stdout"].decode("utf-8", "replace"),
            stderr=self._out["stderr"].decode("utf-8", "replace"),
            timed_out=self.timed_out or cpu_limit, output_exceeded=self.output_exceeded,
            wall_s=time.monotonic() - self._start)

    @property
    def deadline(self) -> float:
        return self._start + self.limits.wall_s

    def _ended(self, streams: set[str]) -> bool:
        """The process has exited and `streams` are closed (or still open 0.1 s after the exit, held by a
        leftover child). With all of `streams` closed, this waits for the exit (up to the deadline)."""
        open_reads = {k.data for k in self._sel.get_map().values() if k.events & selectors.EVENT_READ}
        if not streams & open_reads:
            try:
                self._proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.timed_out = True
                self._kill()
            return True
        if self._proc.poll() is None:
            return False
        now = time.monotonic()
        self._exited_at = self._exited_at or now
        return now - self._exited_at > 0.1

    def _pump(self) -> bool:
        """Wait for I/O once and read what is there; False (process killed) past the deadline or output cap."""
        self._writable: set[str] = set()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            self._kill()
            return False
        for key, events in self._sel.select(timeout=min(remaining, 0.05)):
            if events & selectors.EVENT_WRITE:
                self._writable.add(key.data)
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self._sel.unregister(key.fd)
            elif key.data == "reply":
                self._reply += chunk
                self.output_exceeded |= len(self._reply) > self.limits.output_bytes
            else:
                self._out[key.data] += chunk
                self.output_exceeded |= sum(map(len, self._out.values())) > self.limits.output_bytes
        if self.output_exceeded:
            self._kill()
            return False
        return True

    def _kill(self) -> None:
        self._killed = True
        _kill_group(self._proc)


class SandboxEnded(Exception):
    """The sandboxed process ended (or was stopped) before it replied."""

    def __init__(self, result: RunResult) -> None:
        super().__init__("the sandboxed process ended before replying")
        self.result = result


def run_stdio(source: str, stdin: str = "", limits: Limits = Limits()) -> tuple[RunResult, tuple[str, ...]]:
    """Run `source` as a script on `stdin`; returns the result and the isolation that was applied."""
    with Sandbox(source, "stdio", limits=limits) as box:
        return box.communicate(stdin), box.isolation


# -- what the machine supports ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Support:
    """The isolation this process can apply, probed once (see `support`)."""

    isolation: tuple[str, ...]
    uid: int | None            # sandbox uid ("uid" isolation), else None
    python: str                # interpreter the sandbox runs
    unshare_flags: int
    seccomp: bool              # the seccomp filter can be installed


@functools.lru_cache(maxsize=1)
def _cached_support(pid: int) -> Support:
    root = os.geteuid() == 0
    uid = _claim_uid() if root else None
    features = _probe_features(uid)
    if root and "uid" not in features:
        raise SandboxUnavailable(
            "running as root but cannot switch to an unprivileged uid; root ignores RLIMIT_NPROC, so "
            "untrusted code is not run (run the evaluator as an ordinary user instead)")
    flags = 0
    if "userns" in features:
        flags |= _CLONE_NEWUSER
    if "netns" in features:
        flags |= _CLONE_NEWNET
    if "private_tmp" in features:
        flags |= _CLONE_NEWNS
    seccomp = "seccomp" in features and _seccomp_filter() is not None  # built here, before any fork
    draft = Support(("rlimits", *features), uid if "uid" in features else None, "", flags, seccomp)
    for python in _python_candidates():
        if _interpreter_works(draft, python):
            return Support(draft.isolation, draft.uid, python, flags, seccomp)
    raise SandboxUnavailable(
        "no Python interpreter can be executed by the sandbox user; install one outside private "
        f"directories (tried {_python_candidates()})")


def isolation_support() -> Support:
    """The isolation available to this process (probed once per process; raises SandboxUnavailable)."""
    return _cached_support(os.getpid())


def _python_candidates() -> list[str]:
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
             "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3", path="/usr/bin:/bin") or ""]
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p)))


def _interpreter_works(draft: Support, python: str) -> bool:
    probe = "import json, math, re, collections, itertools\nprint('ok')"
    trial = Support(draft.isolation, draft.uid, python, draft.unshare_flags, draft.seccomp)
    try:
        with Sandbox(probe, limits=Limits(wall_s=10.0), support=trial) as box:
            result = box.communicate("")
    except SandboxUnavailable:
        return False
    return result.returncode == 0 and result.stdout == "ok\n"


def _probe_features(uid: int | None) -> list[str]:
    """Fork a child that tries each isolation step; it reports which ones worked."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: try, report, exit without running any Python cleanup
        os.close(read_fd)
        worked = []
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


def _try_features(uid: int | None) -> list[str]:
    worked = []
    if uid is None:
        try:
            _unshare(_CLONE_NEWUSER)
            _map_own_ids()
            worked.append("userns")
        except OSError:
            pass
    if uid is not None or worked:
        for flag, name in ((_CLONE_NEWNET, "netns"), (_CLONE_NEWNS, "private_tmp")):
            try:
                _unshare(flag)
                if name == "private_tmp":
                    _private_mounts(1)
                worked.append(name)
            except OSError:
                pass
    if uid is not None:  # irreversible for this child: after the namespaces
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            worked.append("uid")
        except OSError:
            pass
    if _seccomp_filter() is not None:
        try:
            _install_seccomp()
            worked.append("seccomp")
        except OSError:
            pass
    return worked


# -- steps run in the forked child before exec -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _map_own_ids() -> None:
    """In a fresh user namespace: map our own uid and gid to themselves (no other ids exist there)."""
    uid, gid = os.getuid(), os.getgid()
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def _private_mounts(size_mb: int) -> None:
    """Make mounts private, then put a small fresh tmpfs over each world-writable directory."""
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    for path in _PRIVATE_MOUNTS:
        if os.path.isdir(path):
            options = f"size={size_mb}m,mode=1777".encode()
            _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options),
                   f"mount tmpfs {path}")


@functools.lru_cache(maxsize=1)
def _seccomp_filter() -> tuple[ctypes.Array, ctypes.Array] | None:
    """The BPF program (and its sock_fprog) that gives foreign syscall ABIs, socket() and
    io_uring_setup() EACCES and allows everything else; None on machines without syscall numbers here.
    Built once in the parent so the forked child installs it without allocating."""
    numbers = _SECCOMP_ARCH.get(platform.machine())
    if numbers is None:
        return None
    arch, *denied = numbers
    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    deny, allow = 0x00050000 | 13, 0x7FFF0000  # SECCOMP_RET_ERRNO | EACCES, SECCOMP_RET_ALLOW

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    prog = [op(ld_w_abs, 4), op(jeq_k, arch, 1, 0), op(ret_k, deny),  # seccomp_data.arch
            op(ld_w_abs, 0), op(jge_k, 0x40000000, len(denied), 0)]   # seccomp_data.nr; x32 ABI: deny
    for i, nr in enumerate(denied):  # a match jumps to the deny below, the last miss to allow
        left = len(denied) - 1 - i
        prog.append(op(jeq_k, nr, left, 0) if left else op(jeq_k, nr, 0, 1))
    prog += [op(ret_k, deny), op(ret_k, allow)]
    code = ctypes.create_string_buffer(b"".join(prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog), ctypes.addressof(code)))
    return code, fprog


def _install_seccomp() -> None:
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _code, fprog = _seccomp_filter()
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def _enter_jail(sup: Support, limits: Limits, workdir: str, source: str) -> None:
    """Runs in the forked child between fork and exec: namespaces, files, limits, then fewer privileges.

    The address-space limit comes last: the child is still a copy of the (possibly large) evaluator.
    """
    if sup.unshare_flags & _CLONE_NEWUSER:
        _unshare(_CLONE_NEWUSER)
        _map_own_ids()
    if sup.unshare_flags & ~_CLONE_NEWUSER:
        _unshare(sup.unshare_flags & ~_CLONE_NEWUSER)
    if "private_tmp" in sup.isolation:
        _private_mounts(limits.file_mb)
    os.chdir(workdir)
    with open(SOLUTION, "w", encoding="utf-8") as f:
        f.write(source)
    cpu = max(1, int(limits.cpu_s + 0.999))
    nproc = limits.processes
    if sup.uid is None and "userns" not in sup.isolation:
        nproc += _task_count(os.getuid())  # the caller's uid is shared: allow only `processes` more
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2),
                       (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
                       (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_NPROC, (nproc, nproc))):
        resource.setrlimit(res, value)
    if sup.uid is not None:
        os.setgroups([])
        os.setgid(sup.uid)
        os.setuid(sup.uid)
    if sup.seccomp:
        _install_seccomp()
    else:
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)


# -- uids and cleanup ------------------------------------------------------------------------------------

_claimed: dict[int, tuple[int, int]] = {}  # pid -> (slot fd, uid): a forked child must claim its own


def _claim_uid() -> int:
    """A sandbox uid no other live evaluator process uses (an exclusive lock on a slot file)."""
    if os.getpid() in _claimed:
        return _claimed[os.getpid()][1]
    _SLOT_DIR.mkdir(mode=0o700, exist_ok=True)
    for slot in range(UID_SLOTS):
        fd = os.open(_SLOT_DIR / str(slot), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        uid = UID_BASE + slot
        _sweep_uid(uid)  # leftovers of an evaluator that died while holding this slot
        _claimed[os.getpid()] = (fd, uid)
        return uid
    raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uid slots in {_SLOT_DIR} are in use")


def sweep_abandoned_slots() -> int:
    """Kill what is left under the uid of every slot whose evaluator process died (its lock is free),
    e.g. a worker stopped by a timeout in the middle of a run. Returns how many slots were swept."""
    if os.geteuid() != 0 or not _SLOT_DIR.is_dir():
        return 0
    swept = 0
    for path in _SLOT_DIR.iterdir():
        if not path.name.isdigit():
            continue
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live evaluator holds it
        else:
            _sweep_uid(UID_BASE + int(path.name))
            swept += 1
        finally:
            os.close(fd)
    return swept


def _pids_of_uid(uid: int) -> list[int]:
    """Processes (zombies included) whose /proc entry belongs to `uid`. A process can hide from this
    (by making itself non-dumpable) but not from `_sweep_uid`'s kill."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _task_count(uid: int) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/task")) for pid in _pids_of_uid(uid) if os.path.isdir(f"/proc/{pid}"))


def _sweep_uid(uid: int, wait_s: float = 2.0) -> bool:
    """Kill every process of `uid` and wait (up to `wait_s`) until they are reaped.

    A forked helper becomes `uid` and calls kill(-1, SIGKILL): the kernel signals every process of that
    uid in one pass, and a fork racing with it fails, so nothing escapes. Reaping matters because
    zombies still count against the next run's RLIMIT_NPROC. Returns True when none is left.
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    end = time.monotonic() + wait_s
    while _pids_of_uid(uid):
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(proc: subprocess.Popen, sup: Support) -> None:
    """Kill the run's process and everything it started, and reap the process."""
    _kill_group(proc)
    proc.wait()
    if sup.uid is not None and not _sweep_uid(sup.uid):
        raise SandboxUnavailable(f"processes of sandbox uid {sup.uid} survived repeated SIGKILL")
