"""Reward integrity: hostile programs that try to learn, keep or fake something across evaluations, or to
slow the judge, get their true reward (0: none of them solves its task), leave nothing behind, and the
judge returns within its deadline plus a small margin.

One test per way in: notes kept between evaluations (System V IPC, keyrings, files), a forged reply
that would make decoding quadratic, a request pipe that is never read, orphans under a PID 1 that
never reaps, reading the host's processes, memory held outside the address space, a program that
kills itself. Where a test needs a mechanism this machine lacks, it skips naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sdpo_fast.envs import CodeEnv
from sdpo_fast.envs.sandbox import Limits, Sandbox, SandboxEnded, jail, process, run_stdio
from tests.conftest import REPO
from tests.envs.sandbox.conftest import ROOT, sysv_objects

LIMITS = Limits(cpu_s=1.0, wall_s=2.0, memory_mb=256, processes=8, file_mb=4, output_bytes=1 << 16)
ENV = CodeEnv(limits=LIMITS, reward_mode="all")
# Time the judge may take past a run's deadline: killing the run's init, the kernel emptying its
# namespaces, reaping, removing the cgroup. Measured well under 0.2 s on 2 loaded cores (see
# test_deadline_margin_is_measured); 1 s keeps the tests steady under CI load.
MARGIN_S = 1.0
def block(code: str) -> str:
    return f"```python\n{code}\n```"


def timed_evaluate(env: CodeEnv, problem: dict, response: str):
    start = time.monotonic()
    result = env.evaluate(problem, response)
    return result, time.monotonic() - start


def timed_run(source: str, limits: Limits = LIMITS):
    """run_stdio, checking the judge was back within the deadline plus the margin."""
    start = time.monotonic()
    result = run_stdio(source, limits=limits)[0]
    assert time.monotonic() - start < limits.wall_s + MARGIN_S
    return result


# -- 1. notes kept between evaluations -------------------------------------------------------------------

NOTES = r'''
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.syscall.restype = ctypes.c_long
KEY, CREATE = 0x5D90, 0o1666
FILES = [os.path.join(d, "sdpo-notes") for d in
         ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/run", "/var/crash", os.path.expanduser("~"), os.getcwd())]

def shm_save(data):
    addr = libc.shmat(libc.shmget(KEY, 4096, CREATE), None, 0)
    if addr and addr != ctypes.c_void_p(-1).value:
        ctypes.memmove(addr, data + b"\0", len(data) + 1)

def shm_load():
    shmid = libc.shmget(KEY, 4096, 0)
    addr = libc.shmat(shmid, None, 0) if shmid >= 0 else None
    return ctypes.string_at(addr).decode() if addr and addr != ctypes.c_void_p(-1).value else ""

class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 512)]

def msg_save(data):
    qid = libc.msgget(KEY, CREATE)
    buf = Msg()
    while libc.msgrcv(qid, ctypes.byref(buf), 512, 0, 0o4000) >= 0:  # IPC_NOWAIT: drain
        pass
    buf = Msg(1, data)
    libc.msgsnd(qid, ctypes.byref(buf), len(data) + 1, 0o4000)

def msg_load():
    qid = libc.msgget(KEY, 0)
    buf = Msg()
    if qid < 0 or libc.msgrcv(qid, ctypes.byref(buf), 512, 0, 0o4000) < 0:
        return ""
    libc.msgsnd(qid, ctypes.byref(buf), len(buf.mtext) + 1, 0o4000)
    return buf.mtext.decode()

def sem_save(data):  # the state as numbers: (1 << len(prefix)) | prefix bits, pending guess + 1
    prefix, _, pending = data.decode().partition("|")
    semid = libc.semget(KEY, 2, CREATE)
    libc.semctl(semid, 0, 16, (1 << len(prefix)) | int(prefix[::-1] or "0", 2))  # SETVAL
    libc.semctl(semid, 1, 16, int(pending) + 1 if pending else 0)

def sem_load():
    semid = libc.semget(KEY, 2, 0)
    if semid < 0:
        return ""
    packed, pending = libc.semctl(semid, 0, 12), libc.semctl(semid, 1, 12)  # GETVAL
    if packed <= 0:
        return ""
    n = packed.bit_length() - 1
    prefix = "".join(str((packed >> i) & 1) for i in range(n))
    return prefix + "|" + (str(pending - 1) if pending > 0 else "")

def key_save(data):  # add_key("user", ..., KEY_SPEC_USER_KEYRING)
    libc.syscall(248, b"user", b"sdpo-notes", data, len(data), -4)

def key_load():
    kid = libc.syscall(250, 10, -4, b"user", b"sdpo-notes", 0)  # KEYCTL_SEARCH
    buf = ctypes.create_string_buffer(512)
    n = libc.syscall(250, 11, kid, buf, 512) if kid > 0 else -1  # KEYCTL_READ
    return buf.raw[:n].decode() if n > 0 else ""

def file_save(data):
    for path in FILES:
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError:
            pass

def file_load():
    for path in FILES:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    return ""

CHANNELS = {CHANNELS}

def load():
    for name in CHANNELS:
        try:
            text = globals()[name + "_load"]()
        except Exception:
            text = ""
        if "|" in text:
            return text
    return "|"

def save(prefix, pending):
    for name in CHANNELS:
        try:
            globals()[name + "_save"]((prefix + "|" + pending).encode())
        except Exception:
            pass

# A run that ended right after guessing bit j got it wrong: the other value is right. A call arriving
# for bit j + 1 means the guess for bit j was right.
PREFIX, _, PENDING = load().partition("|")
if PENDING:
    PREFIX += str(1 - int(PENDING))
    save(PREFIX, "")

def guess(i):
    global PREFIX, PENDING
    if PENDING and i == len(PREFIX) + 1:
        PREFIX += PENDING
        PENDING = ""
    if i < len(PREFIX):
        return int(PREFIX[i])
    PENDING = "0"
    save(PREFIX, PENDING)
    return 0
'''


def _notes_problem() -> tuple[dict, list[int]]:
    bits = [1] + [random.randint(0, 1) for _ in range(9)]  # the program's first guess (0) fails
    test = f"BITS = {bits}\ndef check(candidate):\n    for i, b in enumerate(BITS):\n        assert candidate(i) == b\n"
    return {"prompt": "", "entry_point": "guess", "test": test}, bits


def _search(program: str, problem: dict, bits: list[int]) -> tuple[list[float], list[float]]:
    rewards, seconds = [], []
    for _ in range(sum(bits) + 2):  # enough evaluations to learn every bit if notes survive
        result, elapsed = timed_evaluate(ENV, problem, block(program))
        rewards.append(result.reward)
        seconds.append(elapsed)
    return rewards, seconds


ALL_CHANNELS = ["shm", "msg", "sem", "key", "file"]


def test_notes_between_evaluations_are_lost(support):
    """With notes kept anywhere (System V IPC, the uid's keyring, any writable file), this program
    finds a hidden 10-bit answer bit by bit; here every evaluation starts from nothing."""
    if not {"ipcns", "seccomp"} <= set(support.isolation) or "private_tmp" not in support.isolation:
        pytest.skip("needs an IPC namespace, seccomp and private mounts")
    problem, bits = _notes_problem()
    rewards, seconds = _search(NOTES.replace("{CHANNELS}", repr(ALL_CHANNELS)), problem, bits)
    assert rewards == [0.0] * len(rewards)
    assert max(seconds) < LIMITS.wall_s + MARGIN_S


def test_the_notes_program_does_find_the_answer_when_ipc_is_shared(support, monkeypatch):
    """Control: without the IPC namespace, the same program reaches reward 1 (so the test above can fail)."""
    if "ipcns" not in support.isolation or not ROOT:
        pytest.skip("needs an IPC namespace to take away, and root to clean up after it")
    weak = dataclasses.replace(support, isolation=tuple(i for i in support.isolation if i != "ipcns"),
                               unshare_flags=support.unshare_flags & ~jail.CLONE_NEWIPC)
    monkeypatch.setattr(process, "isolation_support", lambda: weak)
    problem, bits = _notes_problem()
    try:
        rewards, _ = _search(NOTES.replace("{CHANNELS}", repr(["shm"])), problem, bits)
    finally:
        _remove_sysv_objects(support.uid)
    assert rewards[-1] == 1.0 and rewards[0] == 0.0


def _remove_sysv_objects(uid: int) -> None:
    flags = {"shm": "-m", "msg": "-q", "sem": "-s"}
    for kind, fields in list(sysv_objects(uid)):
        subprocess.run(["ipcrm", flags[kind], fields[1]], check=True)


# -- 2. a forged reply that would make decoding quadratic --------------------------------------------------

COLLIDING = (2**61 - 1)  # ints k * (2**61 - 1) all hash to 0

FORGED = r'''
import os, sys
REPLIES = int(sys.argv[4])
def members(n):
    line = '{"ok": {"set": [' + ",".join(str(k * (2**61 - 1)) for k in range(n)) + ']}}\n'
    os.write(REPLIES, line.encode())
    import time; time.sleep(60)
'''


def test_forged_colliding_reply_is_refused_quickly(support):
    problem = {"prompt": "", "entry_point": "members", "test": "def check(candidate):\n"
               "    assert candidate(2500) == {k * (2**61 - 1) for k in range(2500)}\n"}
    for _ in range(2):
        result, elapsed = timed_evaluate(ENV, problem, block(FORGED))
        assert result.reward == 0.0 and "one hash value" in result.feedback  # refused, not decoded
        assert elapsed < LIMITS.wall_s + MARGIN_S


def test_reply_larger_than_the_cap_kills_the_run(support):
    problem = {"prompt": "", "entry_point": "members", "test": "def check(candidate):\n"
               "    assert candidate(40000) == set()\n"}
    result, elapsed = timed_evaluate(ENV, problem, block(FORGED))
    assert result.reward == 0.0 and "Output Limit Exceeded" in result.feedback
    assert elapsed < LIMITS.wall_s + MARGIN_S


def test_decoder_bounds():
    from sdpo_fast.envs.sandbox_runner import MAX_SAME_HASH, decode, encode

    # building these sets would take minutes (50k members of one hash value); refusing them takes ~10 ms.
    # The inputs are made before the clock starts: only the decoder's time is bounded.
    forged = [{"set": [k * COLLIDING for k in range(50_000)]},
              {"dict": [[k * COLLIDING, 0] for k in range(50_000)]},
              {"frozenset": [7] * (MAX_SAME_HASH + 1)}]  # no encoder repeats a member
    for reply in forged:
        start = time.monotonic()
        with pytest.raises(ValueError, match="one hash value"):
            decode(reply)
        assert time.monotonic() - start < 1.0, next(iter(reply))
    grid = {(x, y) for x in range(-30, 30) for y in range(-30, 30)}  # hash(-1) == hash(-2): small groups
    assert decode(encode(grid)) == grid
    big = set(range(100_000))
    assert decode(encode(big)) == big
    assert decode(encode({"a": 1, 2: (3, frozenset({4}))})) == {"a": 1, 2: (3, frozenset({4}))}


def test_long_integers_in_a_reply_are_refused():
    digits = "9" * (process.MAX_INT_DIGITS + 1)
    source = f"import os, sys\ndef f():\n    os.write(int(sys.argv[4]), b'{{\"ok\": {digits}}}\\n')\n    return 1\n"
    with Sandbox(source, "call", "f", LIMITS) as box:
        assert box.call(None) == ("ok", None)
        status, text = box.call([])
    assert status == "error" and "unreadable reply" in text


# -- 3. a request pipe that is never read -----------------------------------------------------------------

STALL = r'''
import fcntl, json, os, sys, time
REQUESTS, REPLIES = int(sys.argv[3]), int(sys.argv[4])
def f(xs):
    fcntl.fcntl(REQUESTS, 1031, 4096)  # F_SETPIPE_SZ: the smallest request pipe
    os.write(REPLIES, b'{"ok": 0}\n')  # answer this call itself, then never read again
    time.sleep(60)
'''


def test_unread_request_pipe_cannot_stall_the_judge():
    big = list(range(5000))  # a request far larger than the pipe
    with Sandbox(STALL, "call", "f", LIMITS) as box:
        assert box.call(None) == ("ok", None)
        assert box.call([[1]]) == ("ok", 0)
        with pytest.raises(SandboxEnded) as ended:
            box.call([big])
        assert ended.value.result.timed_out
        assert time.monotonic() - box._start < LIMITS.wall_s + MARGIN_S
    problem = {"prompt": "", "entry_point": "f", "test": f"def check(candidate):\n    candidate([1])\n"
               f"    assert candidate({big}) == 1\n"}
    for _ in range(2):
        result, elapsed = timed_evaluate(ENV, problem, block(STALL))
        assert result.reward == 0.0 and "Time Limit Exceeded" in result.feedback
        assert elapsed < LIMITS.wall_s + MARGIN_S


# -- 4. orphans under a PID 1 that never reaps -------------------------------------------------------------

ORPHANS = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        if os.fork() == 0:\n"
           "            os.setsid()\n            time.sleep(30 if os.getpid() % 2 else 0)\n"
           "        os._exit(0)\n    os.wait()\nprint('left')\n")

NO_REAPER = r'''
import json, os, sys, time
sys.path[:0] = [sys.argv[1]]
from sdpo_fast.envs.sandbox import Limits, isolation_support, run_stdio
import dataclasses
from sdpo_fast.envs.sandbox import jail
support = isolation_support()
if sys.argv[2] == "subreaper":
    support = dataclasses.replace(support, unshare_flags=support.unshare_flags & ~jail.CLONE_NEWPID,
        isolation=tuple(i for i in support.isolation if i not in ("pidns", "private_proc")) + ("subreaper",))
    import sdpo_fast.envs.sandbox.process as process
    process.isolation_support = lambda: support
seconds, outputs = [], []
for _ in range(4):
    start = time.monotonic()
    result, _ = run_stdio(sys.argv[3], limits=Limits(wall_s=2.0, processes=16))
    seconds.append(time.monotonic() - start)
    outputs.append(result.stdout)
time.sleep(0.2)
zombies = 0
for pid in os.listdir("/proc"):
    if pid.isdigit() and pid != "1":
        with open(f"/proc/{pid}/stat") as f:
            zombies += f.read().rsplit(")", 1)[1].split()[0] == "Z"
print(json.dumps({"pid": os.getpid(), "seconds": seconds, "outputs": outputs, "zombies": zombies,
                  "isolation": list(support.isolation)}))
'''


@pytest.mark.parametrize("reaper", ["pidns", "subreaper"])
def test_cleanup_does_not_depend_on_pid_1(support, reaper):
    """The evaluator runs as PID 1 of its own PID namespace and never reaps anything: orphans of the
    runs must still be reaped (by each run's init, or by the supervisor as subreaper)."""
    if not ROOT or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to start an evaluator as a PID 1 that never reaps")
    if reaper == "pidns" and "pidns" not in support.isolation:
        pytest.skip("needs PID namespaces")
    repo = str(REPO)
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NO_REAPER,
                          repo, reaper, ORPHANS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["pid"] == 1 and reaper in report["isolation"]
    assert report["outputs"] == ["left\n"] * 4
    assert report["zombies"] == 0
    assert max(report["seconds"]) < 2.0 + MARGIN_S


# -- 5. the host's processes ------------------------------------------------------------------------------

def test_host_processes_are_invisible(support):
    if "private_proc" not in support.isolation:
        pytest.skip("needs a private /proc (PID namespace and a proc mount)")
    program = ("import os\nfor pid in sorted(os.listdir('/proc')):\n    try:\n"
               "        print(pid, open(f'/proc/{pid}/cmdline', 'rb').read())\n    except OSError as e:\n"
               "        print(pid, type(e).__name__)\n"
               "for path in ('/proc/loadavg', '/proc/sysvipc/shm', '/proc/keys'):\n"
               "    print(path, os.path.exists(path))\nprint(os.listdir('/sys/fs/cgroup'))\n")
    result = timed_run(program)
    lines = result.stdout.splitlines()
    pids = {line.split()[0] for line in lines if line.split()[0].isdigit()}
    assert pids <= {"1", "2"} and "2" in pids, result.stdout  # only the run itself (1 is hidden: root)
    assert "pytest" not in result.stdout and str(os.getpid()) not in pids
    if tuple(map(int, os.uname().release.split(".")[:2])) >= (5, 8):  # proc's subset=pid
        assert all(line.endswith("False") for line in lines if line.startswith("/proc/"))
    assert lines[-1] == "[]"


# -- 6. memory outside the address space -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memfd", "pipe"])
def test_memory_outside_the_address_space_is_capped(support, kind):
    if "memcg" not in support.isolation:
        pytest.skip("needs a writable memory cgroup (v1 or v2); without it the limit is per address space")
    grab = {"memfd": "fd = os.memfd_create('x')\n    os.write(fd, b'x' * (4 << 20))",
            "pipe": "r, w = os.pipe()\n    fcntl.fcntl(w, 1031, 1 << 20)\n    os.write(w, b'x' * (1 << 20))"}[kind]
    # pipes: the kernel also caps a user's pipe buffers (fs.pipe-user-pages-soft, 64 MB by default)
    step_mb, cap_mb = (4, 128) if kind == "memfd" else (1, 48)
    program = (f"import fcntl, os\nheld = 0\nwhile held < 512:\n    {grab}\n    held += {step_mb}\n"
               "    print(held, flush=True)\n")
    # CPU budget for slow first-touch page faults on some VMs (~12 ms/MB): the memory cap must bind first
    limits = dataclasses.replace(LIMITS, memory_mb=cap_mb, open_files=1024, cpu_s=5.0, wall_s=8.0)
    for _ in range(2):  # the second run gets the whole limit again
        result = timed_run(program, limits)
        held = int(result.stdout.split()[-1]) if result.stdout.split() else 0
        assert held < cap_mb and result.memory_exceeded and result.returncode == -signal.SIGKILL, result
        assert "Memory limit exceeded" in result.exit_reason()
    problem = {"prompt": "", "tests": [{"input": "", "output": "1"}]}
    feedback = CodeEnv(limits=limits).evaluate(problem, block(program)).feedback
    assert "Runtime Error" in feedback and "Memory limit exceeded" in feedback


# -- 7. a program that kills itself ------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGXCPU, signal.SIGSEGV])
def test_self_kill_is_a_runtime_error(sig):
    result = timed_run(f"import os\nprint('bye', flush=True)\nos.kill(os.getpid(), {int(sig)})\n")
    assert result.returncode == -sig and not result.timed_out and result.stdout == "bye\n"
    assert result.exit_reason() == f"Killed by signal {int(sig)} ({sig.name})"
    stdio = ENV.evaluate({"prompt": "", "tests": [{"input": "", "output": "bye"}]},
                         block(f"import os\nprint('bye', flush=True)\nos.kill(os.getpid(), {int(sig)})"))
    assert stdio.reward == 0.0 and "Runtime Error" in stdio.feedback and f"Killed by signal {int(sig)}" in stdio.feedback
    functional = ENV.evaluate({"prompt": "", "entry_point": "f", "test": "assert f() == 1\n"},
                              block(f"import os\ndef f():\n    os.kill(os.getpid(), {int(sig)})"))
    assert "Runtime Error" in functional.feedback and f"Killed by signal {int(sig)}" in functional.feedback


def test_cpu_limit_is_still_a_time_limit():
    result = run_stdio("while True:\n    pass\n", limits=dataclasses.replace(LIMITS, wall_s=4.0))[0]
    assert result.timed_out and result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert result.cpu_s >= 0.5


# -- beyond the list: what else a run could see or keep ----------------------------------------------------

def test_a_run_inherits_nothing_and_sees_a_read_only_system(support):
    if not {"readonly_fs", "private_tmp"} <= set(support.isolation):
        pytest.skip("needs a private mount namespace with mount_setattr (Linux 5.12+)")
    program = ("import os, resource\nprint(sorted(os.listdir('/proc/self/fd')))\n"
               "for path in ('/etc/sdpo-probe', os.path.join(os.path.dirname(os.__file__), 'sdpo-probe')):\n"
               "    try:\n        open(path, 'w')\n        print('wrote', path)\n"
               "    except OSError as e:\n        print(e.errno)\n"
               "open('/tmp/scratch', 'w').write('x')\nprint(open('/tmp/scratch').read())\n"
               "print(resource.getrlimit(resource.RLIMIT_NPROC))\n")
    result = timed_run(program)
    lines = result.stdout.splitlines()
    assert lines[0] == "['0', '1', '2', '3']"  # stdio and the listing's own descriptor
    assert lines[1:3] == ["30", "30"]  # EROFS (root's files would also refuse the sandbox uid)
    assert lines[3] == "x" and lines[4] == f"({LIMITS.processes}, {LIMITS.processes})"


def test_deadline_margin_is_measured():
    """The judge's time past the deadline (kill, reap, remove the cgroup), over a few runs that hit it."""
    extra = []
    for _ in range(3):
        start = time.monotonic()
        result = run_stdio("import os, time\nfor _ in range(4):\n    os.fork()\ntime.sleep(30)\n",
                           limits=dataclasses.replace(LIMITS, wall_s=0.5, processes=32))[0]
        assert result.timed_out
        extra.append(time.monotonic() - start - 0.5)
    print("seconds past the deadline:", [round(e, 3) for e in extra])
    assert max(extra) < MARGIN_S
