"""Environments that misbehave on purpose, for the batch-evaluation tests (importable by workers)."""

import os
import time
from dataclasses import dataclass

from sdpo_fast.envs import Evaluation


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
        return Evaluation(problem["x"] / 10, f"saw {response}", {"pid": os.getpid()})
