"""One sandboxed run: start it, move its bytes, hold its deadline, read its end.

Everything the judge does with the running program goes through one select() loop under one
deadline (`Limits.wall_s`): stdin and request writes are non-blocking (a program that stops reading,
or shrinks a pipe, cannot stall the judge), output is capped (`output_bytes`) and so is each reply
(`reply_cap`), and the process's exit wakes the loop through a pidfd. Replies are decoded with size and
hash-collision bounds (`sandbox_runner.decode`), so a forged reply cannot make decoding slow.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sdpo_fast.envs import sandbox_runner
from sdpo_fast.envs.sandbox import cgroup, jail
from sdpo_fast.envs.sandbox.limits import Limits, SandboxUnavailable
from sdpo_fast.envs.sandbox.slots import kill_uid
from sdpo_fast.envs.sandbox.support import Support, isolation_support

RUNNER_SOURCE = Path(sandbox_runner.__file__).read_text()
MAX_INT_DIGITS = 4300  # a longer integer in a reply is refused (str -> int is quadratic)
_EXIT_GRACE_S = 0.1    # after the exit, how long output still held by a leftover process is read
_SUPERVISOR_EXIT_S = 10.0


@dataclass(frozen=True)
class RunResult:
    """What happened to a finished sandboxed process (its output is untrusted text)."""

    returncode: int | None     # negative: killed by that signal; None: still running when we killed it
    stdout: str
    stderr: str
    timed_out: bool            # wall-clock deadline, or killed by the CPU limit after using it
    output_exceeded: bool      # output or reply cap
    wall_s: float
    memory_exceeded: bool = False  # killed by the run's memory cgroup
    cpu_s: float = 0.0         # CPU time of the run's processes

    def exit_reason(self) -> str:
        """Why the program stopped, in words for the feedback (for a program that failed)."""
        if self.memory_exceeded:
            return "Memory limit exceeded: the program was killed"
        if self.returncode is not None and self.returncode < 0:
            number = -self.returncode
            try:
                name = f" ({signal.Signals(number).name})"
            except ValueError:
                name = ""
            return f"Killed by signal {number}{name}"
        return f"the program exited with status {self.returncode}"


class SandboxEnded(Exception):
    """The sandboxed process ended (or was stopped) before it replied."""

    def __init__(self, result: RunResult) -> None:
        super().__init__("the sandboxed process ended before replying")
        self.result = result


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
        self._cgroup: str | None = None
        self._exit_fd = self._init_fd = self._init_pid = None
        self._returncode: int | None = None
        self._cpu_s = 0.0
        self._writable: set[str] = set()

    # -- start and stop -------------------------------------------------------------------------------

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
            argv += [self.entry, str(req_r), str(rep_w), str(self.limits.reply_cap)]
        report_r, report_w = os.pipe() if sup.pidns else (None, None)
        try:
            if sup.memcg is not None:
                self._cgroup = sup.memcg.create(self.limits.memory_mb, sup.uid)
            plan = jail.Plan(sup.isolation, sup.uid, sup.unshare_flags, self._workdir, self.source,
                             self.limits, self._cgroup, report_w)
            self._start = time.monotonic()
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if self.mode == "stdio" else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                start_new_session=True, preexec_fn=functools.partial(jail.enter, plan), pass_fds=child_fds)
        except (OSError, subprocess.SubprocessError) as exc:
            if self.mode == "call":
                os.close(self._req_w)
                os.close(self._rep_r)
            if report_r is not None:
                os.close(report_r)
            self._remove_files()
            raise SandboxUnavailable(f"could not start the sandboxed process: {exc}") from exc
        finally:
            for fd in (*child_fds, report_w):
                if fd is not None:
                    os.close(fd)
        self._exit_fd = _pidfd(self._proc.pid)
        if report_r is not None:
            self._init_fd = self._open_init(report_r)
        self._sel = selectors.DefaultSelector()
        for name in ("stdout", "stderr"):
            fd = getattr(self._proc, name).fileno()
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_READ, name)
        if self.mode == "call":
            os.set_blocking(self._rep_r, False)
            os.set_blocking(self._req_w, False)
            self._sel.register(self._rep_r, selectors.EVENT_READ, "reply")
        if self._exit_fd is not None:
            self._sel.register(self._exit_fd, selectors.EVENT_READ, "exit")
        return self

    def _open_init(self, report_r: int) -> int | None:
        """A pidfd on the run's init (its pid comes from the supervisor), to kill the whole namespace."""
        with os.fdopen(report_r, "rb") as f:
            data = f.read(4)
        if len(data) != 4:
            return None
        self._init_pid = struct.unpack("i", data)[0]
        fd = _pidfd(self._init_pid)
        if fd is not None and self._poll() is not None:  # the run already ended: the pid may be reused
            os.close(fd)
            return None
        return fd

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything the run started and remove its files and cgroup (idempotent)."""
        if self._proc is None:
            return
        proc = self._proc
        try:
            if self._poll() is None:
                self._kill()
                if self._wait(_SUPERVISOR_EXIT_S) is None:
                    _kill_group(proc.pid)
                    self._wait(None)
                    raise SandboxUnavailable("the sandbox supervisor did not exit after the run was killed")
            if not (self.support.pidns or self.support.uid is not None):
                _kill_group(proc.pid)  # unsupervised: whatever is left in the process group
        finally:
            self._proc = None
            self._sel.close()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            fds = [self._exit_fd, self._init_fd] + ([self._req_w, self._rep_r] if self.mode == "call" else [])
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            self._remove_files()

    def _remove_files(self) -> None:
        if self._workdir and self._workdir != "/tmp":
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        if self._cgroup is not None:
            path, self._cgroup = self._cgroup, None
            if not cgroup.remove(path):
                raise SandboxUnavailable(f"the run's memory cgroup {path} could not be removed")

    def _kill(self) -> None:
        """SIGKILL the run: its init (the kernel then empties the PID namespace), else the sandbox uid
        (the supervisor reaps), else the process group."""
        self._killed = True
        if self._init_fd is not None:
            try:
                signal.pidfd_send_signal(self._init_fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self._init_pid is not None:  # no pidfd (Linux < 5.3): the supervisor's exit frees the pid
            if self._poll() is None:
                try:
                    os.kill(self._init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif self.support.uid is not None:
            kill_uid(self.support.uid)
        else:
            _kill_group(self._proc.pid)

    # -- the supervisor's exit ------------------------------------------------------------------------

    def _poll(self) -> int | None:
        """The return code once the supervisor has exited (reaped here, with its CPU time), else None."""
        if self._returncode is None and self._proc is not None:
            try:
                pid, status, usage = os.wait4(self._proc.pid, os.WNOHANG)
            except ChildProcessError:
                return self._returncode
            if pid:
                self._returncode = self._proc.returncode = os.waitstatus_to_exitcode(status)
                self._cpu_s = usage.ru_utime + usage.ru_stime
                self._exited_at = time.monotonic()
        return self._returncode

    def _wait(self, timeout: float | None) -> int | None:
        end = None if timeout is None else time.monotonic() + timeout
        while self._poll() is None:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self._exit_fd is not None:
                _wait_readable(self._exit_fd, left)
            else:
                time.sleep(0.001 if left is None else min(0.001, left))
        return self._returncode

    # -- I/O ------------------------------------------------------------------------------------------

    def communicate(self, stdin: str) -> RunResult:
        """stdio mode: feed `stdin`, wait for the program to end (or the deadline), return what happened."""
        pending = memoryview(stdin.encode())
        fd = self._proc.stdin.fileno()
        if pending:
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_WRITE, "stdin")
        else:
            self._proc.stdin.close()
        while self._pump() and not self._finished({"stdout", "stderr"}):
            if pending and "stdin" in self._writable:
                pending = self._write(fd, pending)
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
            message = {"args": sandbox_runner.encode(list(args)),
                       "kwargs": [[k, sandbox_runner.encode(v)] for k, v in (kwargs or {}).items()]}
            self._send(memoryview(json.dumps(message).encode() + b"\n"))
        while b"\n" not in self._reply:
            if not self._pump() or self._finished({"reply"}):
                raise SandboxEnded(self.result())
        line, _, rest = bytes(self._reply).partition(b"\n")
        self._reply = bytearray(rest)
        try:  # the reply is untrusted: anything unreadable is the program's failure
            message = json.loads(line, parse_int=_bounded_int)
            if type(message) is dict and set(message) == {"ok"}:
                return "ok", sandbox_runner.decode(message["ok"])
            return "error", str(message["error"])[:sandbox_runner.MAX_TRACEBACK_CHARS + 100]
        except Exception as exc:
            return "error", f"the program sent an unreadable reply ({type(exc).__name__}: {exc})"[:300]

    def _send(self, pending: memoryview) -> None:
        """Write a request without ever blocking: the deadline holds even if the program never reads."""
        self._sel.register(self._req_w, selectors.EVENT_WRITE, "request")
        try:
            while pending:
                if not self._pump() or self._returncode is not None:
                    raise SandboxEnded(self.result())
                if "request" in self._writable:
                    pending = self._write(self._req_w, pending, ended=True)
        finally:
            self._sel.unregister(self._req_w)

    def _write(self, fd: int, pending: memoryview, ended: bool = False) -> memoryview:
        try:
            return pending[os.write(fd, pending):]
        except BlockingIOError:
            return pending
        except BrokenPipeError:
            if ended:
                raise SandboxEnded(self.result()) from None
            return pending[:0]

    def result(self) -> RunResult:
        """The run so far; waits briefly for the exit status of a process that is ending."""
        code = self._poll()
        if code is None and not self._killed:
            code = self._wait(max(0.0, min(0.2, self.deadline - time.monotonic())))
        signum = -code if code is not None and code < 0 else 0
        # RLIMIT_CPU sends SIGXCPU at the soft limit, SIGKILL a second later. The CPU time read back
        # at exit can run well below the kernel's tick count (7% seen in a VM), hence the slack. A
        # program that kills itself before using its CPU gets its signal reported, not a time limit.
        soft_cpu = max(1, int(self.limits.cpu_s + 0.999))
        cpu_limit = not self._killed and (signum == signal.SIGXCPU and self._cpu_s >= 0.5 * soft_cpu
                                          or signum == signal.SIGKILL and self._cpu_s >= soft_cpu)
        memory = (signum == signal.SIGKILL and not cpu_limit and self._cgroup is not None
                  and self.support.memcg.oom_kills(self._cgroup) > 0)
        return RunResult(
            returncode=code, stdout=self._out["stdout"].decode("utf-8", "replace"),
            stderr=self._out["stderr"].decode("utf-8", "replace"),
            timed_out=self.timed_out or cpu_limit, output_exceeded=self.output_exceeded,
            wall_s=time.monotonic() - self._start, memory_exceeded=memory, cpu_s=self._cpu_s)

    @property
    def deadline(self) -> float:
        return self._start + self.limits.wall_s

    def _finished(self, streams: set[str]) -> bool:
        """The process has exited and `streams` are closed, or are still open `_EXIT_GRACE_S` after the
        exit (held by a leftover process of an unsupervised run)."""
        if self._poll() is None:
            return False
        open_reads = {k.data for k in self._sel.get_map().values() if k.events & selectors.EVENT_READ}
        return not streams & open_reads or time.monotonic() - self._exited_at > _EXIT_GRACE_S

    def _pump(self) -> bool:
        """Wait for I/O once and read what is there; False (process killed) past the deadline or a cap."""
        self._writable = set()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            self._kill()
            return False
        polling = self._exit_fd is None or self._returncode is not None
        for key, events in self._sel.select(timeout=min(remaining, 0.05) if polling else remaining):
            if key.data == "exit":
                self._sel.unregister(key.fd)
                self._poll()
                continue
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
                self.output_exceeded |= len(self._reply) > self.limits.reply_cap
            else:
                self._out[key.data] += chunk
                self.output_exceeded |= sum(map(len, self._out.values())) > self.limits.output_bytes
        if self.output_exceeded:
            self._kill()
            return False
        return True


def run_stdio(source: str, stdin: str = "", limits: Limits = Limits()) -> tuple[RunResult, tuple[str, ...]]:
    """Run `source` as a script on `stdin`; returns the result and the isolation that was applied."""
    with Sandbox(source, "stdio", limits=limits) as box:
        return box.communicate(stdin), box.isolation


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _pidfd(pid: int) -> int | None:
    """A pidfd on `pid` (readable once it exits), or None where the kernel or Python has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_readable(fd: int, timeout: float | None) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        sel.select(timeout)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
