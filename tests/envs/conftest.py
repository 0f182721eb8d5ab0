"""Shared helpers of the environment tests: a check for leftover processes, and an environment that
misbehaves on purpose (a module-level class, so the batch evaluator's forkserver workers can import it)."""

import os
import time
from dataclasses import dataclass

from sdpo_fast.envs import Evaluation, Sandbox

DAEMON = ("import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
          "print('started')\n")


@dataclass(frozen=True)
class ScriptedEnv:
    """Reward = problem["x"] / 10; problem["do"] may make the evaluation crash, hang, raise or lie."""

    def evaluate(self, problem: dict, response: str) -> Evaluation:
        action = problem.get("do")
        if action == "crash":
            os._exit(3)
        if action == "hang":
            time.sleep(600)
        if action == "raise":
            raise RuntimeError("broken evaluator")
        if action == "wrong type":
            return 1.0
        if action == "daemon then hang":  # a sandboxed daemon is running when the worker is stopped
            with Sandbox(DAEMON.format(marker=problem["marker"])) as box:
                box.communicate("")
                time.sleep(600)
        return Evaluation(problem["x"] / 10, f"saw {response}", {"pid": os.getpid()})


def processes_ending_with(marker: str) -> list[str]:
    """Process ids whose command line ends with `marker` (a process a test started must be gone)."""
    return [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith(marker)]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
