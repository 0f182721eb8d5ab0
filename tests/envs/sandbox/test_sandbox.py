"""The sandbox on its own: limits first checked on harmless probes, then the hostile programs.

The order matters: the process cap is verified with a bounded probe before the fork bomb runs.
"""

import os
import signal
import socket
import uuid

import pytest

from sdpo_fast.envs.sandbox import Limits, Sandbox, run_stdio
from sdpo_fast.envs.sandbox import cgroup
from tests.conftest import REPO
from tests.envs.conftest import processes_ending_with
from tests.envs.sandbox.conftest import ROOT

LIMITS = Limits(cpu_s=1.0, wall_s=2.0, memory_mb=256, processes=6, file_mb=4, output_bytes=1 << 16)


def run(source: str, stdin: str = "", limits: Limits = LIMITS):
    result, _ = run_stdio(source, stdin, limits)
    return result


def test_isolation_applied(support):
    assert "rlimits" in support.isolation and "seccomp" in support.isolation
    if ROOT:  # root must never run untrusted code as root
        assert "uid" in support.isolation and support.uid >= 2_000_000_000
        assert {"netns", "ipcns", "pidns", "private_tmp"} <= set(support.isolation)
        # features whose loss would only turn their tests into skips, checked against the machine itself
        if cgroup.find_memory_cgroups() is not None:
            assert "memcg" in support.isolation
        if tuple(map(int, os.uname().release.split(".")[:2])) >= (5, 12):  # mount_setattr, proc's hidepid
            assert {"readonly_fs", "private_proc"} <= set(support.isolation)
    result = run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
    if ROOT:
        assert result.stdout.split()[:2] == [str(support.uid)] * 2


def test_stdio_roundtrip_and_scrubbed_env(monkeypatch):
    monkeypatch.setenv("SDPO_TEST_SECRET", "hunter2")
    result = run("import os, sys\nprint(input()[::-1])\nprint(sorted(os.environ))\n"
                 "print(open('/proc/%d/environ' % os.getppid(), 'rb').read() if os.getppid() > 0 else '')",
                 "hello\n")
    assert result.stdout.startswith("olleh\n")
    assert "SDPO_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout
    # the parent's environ is closed: not permitted, or (private /proc) not even visible
    assert result.returncode == 1
    assert "PermissionError" in result.stderr or "FileNotFoundError" in result.stderr


def test_runtime_error_has_short_traceback():
    result = run("def f(x):\n    return 1 / x\nf(0)\n")
    assert result.returncode == 1 and not result.timed_out
    assert 'File "solution.py", line 2, in f' in result.stderr and "ZeroDivisionError" in result.stderr
    assert "sandbox_runner" not in result.stderr and "<string>" not in result.stderr


def test_cpu_and_wall_limits():
    busy = run("while True:\n    pass\n")
    assert busy.timed_out and busy.returncode in (-signal.SIGXCPU, -signal.SIGKILL, None)
    sleepy = run("import time\ntime.sleep(30)\n", limits=Limits(cpu_s=1.0, wall_s=0.5))
    assert sleepy.timed_out and sleepy.wall_s < 2.0


def test_memory_bomb_fails_inside_the_sandbox():
    # a smaller cap and a longer CPU budget: first-touch page faults cost up to ~12 ms/MB of CPU on some
    # VMs (Firecracker), so filling 256 MB can outlast a 1 s CPU limit before the address space runs out
    limits = Limits(cpu_s=5.0, wall_s=8.0, memory_mb=96, processes=6, file_mb=4, output_bytes=1 << 16)
    result = run("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 22))\n", limits=limits)
    assert result.returncode == 1 and "MemoryError" in result.stderr


def test_process_cap_holds_on_a_bounded_probe():
    probe = ("import os, time\nmade = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(0.3)\n        os._exit(0)\n"
             "    made += 1\nprint(made)\n")
    result = run(probe)
    assert result.returncode == 0 and 0 < int(result.stdout) < LIMITS.processes


def test_fork_bomb_is_capped_and_cleaned_up(support):
    if not ROOT and "userns" not in support.isolation:
        pytest.skip("needs root (sandbox uid) or a user namespace to cap processes per run")
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert result.timed_out  # killed at the deadline; the fixture checks nothing survived


def test_child_outliving_its_parent_is_killed():
    marker = f"{uuid.uuid4().int % 10**6}.123"
    result = run(f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                 f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\nprint('bye')\n")
    assert result.stdout == "bye\n"
    assert processes_ending_with(marker) == []

def test_writes_outside_the_workdir_do_not_reach_the_host(tmp_path):
    name = f"sdpo-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(tmp_path / name),
               os.path.join(os.getcwd(), name)]
    source = "import os\n" + "".join(
        f"try:\n    open({t!r}, 'w').write('x')\n    print('wrote', {t!r})\nexcept OSError as e:\n"
        f"    print('denied', {t!r})\n" for t in targets)
    result = run(source)
    assert result.returncode == 0
    assert not any(os.path.exists(t) for t in targets)


def test_file_size_limit():
    result = run("with open('big', 'wb') as f:\n    f.write(b'x' * (8 << 20))\n")
    assert result.returncode != 0


def test_sockets_are_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        result = run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                     f"    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n")
        assert result.stdout.startswith("refused")
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_output_flood_is_cut():
    result = run("while True:\n    print('x' * 1000)\n")
    assert result.output_exceeded and len(result.stdout) <= LIMITS.output_bytes + 65536


def test_killing_the_parent_fails_and_evaluator_survives(support):
    if not ROOT:
        pytest.skip("the evaluator is protected by the sandbox uid only when it runs as root")
    result = run("import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError as e:\n"
                 "    print('denied', e.errno)\nos.kill(-1, signal.SIGKILL)\n")
    assert result.stdout.startswith("denied")
    assert run("print('still here')").stdout == "still here\n"


def test_call_mode_rejects_non_plain_values():
    source = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef f(x):\n    return Any()\n"
    with Sandbox(source, "call", "f", LIMITS) as box:
        assert box.call(None) == ("ok", None)
        status, text = box.call([1])
        assert status == "error" and "not plain data" in text
        assert box.call([1]) == ("error", text)


def test_limits_validation():
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match="mode"):
        Sandbox("pass", "shell")


UNPRIVILEGED_PROBE = r'''
import os, sys, types
for name in ("sdpo_fast", "sdpo_fast.envs"):  # load the sandbox alone (the package imports torch)
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(sys.argv[1], *name.split("."))]
    sys.modules[name] = module
from sdpo_fast.envs.sandbox import Limits, isolation_support, run_stdio
program = """import os, socket
made = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        import time; time.sleep(0.3); os._exit(0)
    made += 1
try:
    socket.socket()
    print("socket")
except OSError:
    print("no socket")
print(made)
"""
result, isolation = run_stdio(program, limits=Limits(processes=4, wall_s=5.0))
print(",".join(isolation))
print(result.stdout, end="")
'''


def test_unprivileged_evaluator_degrades_safely():
    """Without root: no uid switch, but a user namespace (if allowed) still caps processes per run."""
    import shutil
    import subprocess

    if not ROOT or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start an unprivileged evaluator")
    repo = str(REPO)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]
    readable = f"open({os.path.join(repo, 'sdpo_fast', 'envs', 'sandbox', '__init__.py')!r}).read()"
    if subprocess.run(as_nobody + [readable], capture_output=True).returncode != 0:
        pytest.skip("the checkout is not readable by an unprivileged user")
    out = subprocess.run(as_nobody + [UNPRIVILEGED_PROBE, repo], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    isolation, sockets, made = out.stdout.splitlines()
    assert "uid" not in isolation.split(",") and "rlimits" in isolation
    if "seccomp" in isolation:
        assert sockets == "no socket"
    assert int(made) < 4 if "userns" in isolation else int(made) <= 20
