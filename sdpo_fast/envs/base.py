"""The environment protocol and parallel batch evaluation.

An environment is any picklable object with `evaluate(problem: dict, response: str) -> Evaluation`
(reward in [0, 1], feedback text, details for logging). `BatchEvaluator` runs a batch in a pool of worker
processes with a timeout per item; an item whose evaluation raises, hangs past the timeout or kills its
worker gets reward 0 and an `"error"` in its details, and the rest of the batch (and the caller) carry
on; sandboxed processes a stopped worker leaves behind are killed (`sweep_abandoned_slots`). Results
come back in input order and do not depend on scheduling.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol, Sequence

from pebble import ProcessExpired, ProcessPool

from sdpo_fast.envs.outcome import Evaluation
from sdpo_fast.envs.sandbox import sweep_abandoned_slots

log = logging.getLogger(__name__)


class Environment(Protocol):
    """Evaluates one response to one problem."""

    def evaluate(self, problem: dict, response: str) -> Evaluation: ...


class BatchEvaluator:
    """A pool of `workers` processes evaluating (problem, response) pairs with `env`.

    Workers are forked from a fresh fork server (never from the caller, which may hold a model and
    threads) and replaced when one dies or is stopped at `timeout_s`. Use as a context manager, or call
    `close()`.
    """

    def __init__(self, env: Environment, workers: int = 2, timeout_s: float = 60.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.env, self.timeout_s = env, timeout_s
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["sdpo_fast.envs"])
        self._pool = ProcessPool(max_workers=workers, context=context)

    def evaluate(self, problems: Sequence[dict], responses: Sequence[str]) -> list[Evaluation]:
        """One `Evaluation` per pair, in order."""
        if len(problems) != len(responses):
            raise ValueError(f"got {len(problems)} problems but {len(responses)} responses")
        futures = [self._pool.schedule(_evaluate_one, (self.env, p, r), timeout=self.timeout_s)
                   for p, r in zip(problems, responses)]
        results = [self._collect(i, f) for i, f in enumerate(futures)]
        if any("error" in r.details for r in results):
            sweep_abandoned_slots()  # a stopped worker may have left sandboxed processes behind
        return results

    def _collect(self, index: int, future) -> Evaluation:
        try:
            return future.result()
        except FutureTimeout:
            error, feedback = f"timed out after {self.timeout_s:g} s", "The evaluation timed out."
        except ProcessExpired as exc:
            error, feedback = f"evaluation worker died (exit code {exc.exitcode})", ""
        except Exception as exc:
            error, feedback = f"{type(exc).__name__}: {exc}", ""
        log.warning("evaluation of item %d failed: %s", index, error)
        return Evaluation(0.0, feedback, {"error": error})

    def close(self) -> None:
        """Stop the workers and kill whatever sandboxed processes they left."""
        self._pool.stop()
        self._pool.join()
        sweep_abandoned_slots()

    def __enter__(self) -> BatchEvaluator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def evaluate_batch(env: Environment, problems: Sequence[dict], responses: Sequence[str], workers: int = 2,
                   timeout_s: float = 60.0) -> list[Evaluation]:
    """Evaluate one batch with a temporary `BatchEvaluator` (keep one open to reuse its workers)."""
    with BatchEvaluator(env, workers, timeout_s) as evaluator:
        return evaluator.evaluate(problems, responses)


def _evaluate_one(env: Environment, problem: dict, response: str) -> Evaluation:
    result = env.evaluate(problem, response)
    if not isinstance(result, Evaluation):
        raise TypeError(f"{type(env).__name__}.evaluate returned {type(result).__name__}, not Evaluation")
    return result
