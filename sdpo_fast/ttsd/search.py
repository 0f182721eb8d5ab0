"""Test-time search for a solution to ONE problem: SDPO on that problem, or a baseline at the same budget.

Every method samples `batch` attempts per round, evaluates them and stops at the first success (reward 1,
every check passes); it stops without one when `budget` attempts are spent.

- "sdpo" (test-time self-distillation): after a failed round, one SDPO step on this round's attempts
  (the trainer's `update`: the self-teacher sees each attempt's feedback; by default the reverse KL on
  the student's top-20 tokens with advantages clipped to 5). The next round samples from the new weights.
- "best-of-k": independent samples from the unchanged model (after the first round, the rest of the
  budget in one call: attempts count in sampling order, as within any round).
- "multi-turn": `batch` conversations; after a failed attempt, its feedback goes into the conversation
  as the next user turn and the model answers again (the last `history` attempts stay in context).

A `Searcher` holds one model and restores its trainer's state (weights, teacher, optimizer, scheduler) to
the initial one before every search, so searches on different problems (or seeds) do not leak into each other.
All methods draw their first round alike (initial weights, the seed's first draws): with equal seeds
they share it, and the searcher samples it once.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from sdpo_fast.algorithm.reprompt import FEEDBACK_TEMPLATE
from sdpo_fast.envs import Environment
from sdpo_fast.files import write_atomically
from sdpo_fast.rollout import generate
from sdpo_fast.train.data import Task
from sdpo_fast.train.evaluate import prompt_ids
from sdpo_fast.train.rng import seed_everything
from sdpo_fast.train.trainer import Trainer
from sdpo_fast.ttsd.config import METHODS, Method, SearchOptions, TTSDConfig
from sdpo_fast.ttsd.problems import problem_of

RETRY_TEMPLATE = FEEDBACK_TEMPLATE.strip() + "\n\nCorrectly solve the original question."
NO_FEEDBACK = "(no feedback: the answer is not correct)"


@dataclass
class SearchResult:
    """The outcome of one search.

    attempts: the number of attempts up to and including the first success (attempts of a round count
    in sampling order), None when unsolved. generated: attempts sampled in all (whole rounds).
    """

    method: str
    seed: int
    solved: bool
    attempts: int | None
    generated: int
    rounds: int
    solution: str | None
    seconds: float
    log: list[dict] = field(default_factory=list)


class Searcher:
    """One model searching problems of one environment; see the module docstring.

    `evaluator`: anything with `evaluate(problems, responses) -> list[Evaluation]` and `close()`, used
    instead of a process pool over `env` (tests force outcomes with it).
    """

    def __init__(self, options: SearchOptions, env: Environment, evaluator=None):
        self.options = options
        self.trainer = Trainer(options.train_config(), task=Task("ttsd", [], [], env), evaluator=evaluator)
        if self.trainer.rt.world_size != 1:
            self.trainer.close()
            raise ValueError("test-time search runs in one process; do not launch it with torchrun")
        self.tokenizer = self.trainer.tokenizer
        self._initial = copy.deepcopy(self.trainer.state_dict())
        self._cached_round: tuple | None = None  # see `_first_round`

    def close(self) -> None:
        self.trainer.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def restore(self) -> None:
        """The trainer (weights, teacher, optimizer, scheduler) back to its state when the searcher was built."""
        self.trainer.load_state_dict(copy.deepcopy(self._initial))

    def search(self, problem: dict, method: Method, seed: int = 0,
               on_round: Callable[[dict], None] | None = None) -> SearchResult:
        """Search `problem` with `method` from the initial weights; `on_round` gets each round's record."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.restore()
        seed_everything(seed)
        opts, t = self.options, self.trainer
        start = time.perf_counter()
        question = t.task.messages(problem)
        prompt = prompt_ids(self.tokenizer, question)
        turns: list[list[dict]] = [[] for _ in range(opts.batch)]  # multi-turn: earlier attempts + feedback
        used, log = 0, []
        while used < opts.budget:
            # best-of-k: after the shared first round, all remaining (independent) attempts in one call
            n = opts.budget - used if method == "best-of-k" and log else min(opts.batch, opts.budget - used)
            t0 = time.perf_counter()
            if not log:
                responses, texts, evals = self._first_round(problem, prompt, n, seed)
            elif method == "multi-turn":
                responses, texts, evals = self._attempts(
                    problem, [prompt_ids(self.tokenizer, question + turns[i]) for i in range(n)], 1)
            else:
                responses, texts, evals = self._attempts(problem, [prompt], n)
            rewards = [e.reward for e in evals]
            feedback = [e.feedback for e in evals]
            first = next((i for i, r in enumerate(rewards) if r >= 1.0), None)
            record = {"round": len(log) + 1, "method": method, "seed": seed, "rewards": rewards,
                      "solved": first is not None, "responses": texts, "feedback": feedback, "update": None}
            used += n
            if first is None and used < opts.budget:
                if method == "sdpo":
                    record["update"] = t.update([question], [prompt], responses, rewards, feedback)
                elif method == "multi-turn":
                    for i in range(n):
                        turns[i] += [{"role": "assistant", "content": texts[i]},
                                     {"role": "user", "content": _retry_message(feedback[i])}]
                        del turns[i][:-2 * opts.history]
            record.update(attempts=used, seconds=time.perf_counter() - t0)
            log.append(record)
            if on_round is not None:
                on_round(record)
            if first is not None:
                return SearchResult(method, seed, True, used - n + first + 1, used, len(log), texts[first],
                                    time.perf_counter() - start, log)
        return SearchResult(method, seed, False, None, used, len(log), None, time.perf_counter() - start, log)

    def _attempts(self, problem: dict, prompts: list[list[int]], n: int,
                  sampled: tuple[list, list[str]] | None = None) -> tuple[list, list[str], list]:
        """`n` sampled responses per prompt (or the given `sampled` ones): token ids, texts, evaluations."""
        t = self.trainer
        if sampled is None:
            rollouts = generate(t.policy, prompts, n, t.sampling, eos_token_ids=t.eos,
                                pad_token_id=self.tokenizer.pad_token_id, batch_size=t.cfg.generation_batch_size)
            sampled = rollouts.responses, self.tokenizer.batch_decode(rollouts.responses, skip_special_tokens=True)
        responses, texts = sampled
        return responses, texts, t.evaluator.evaluate([problem] * len(texts), texts)

    def _first_round(self, problem: dict, prompt: list[int], n: int, seed: int) -> tuple[list, list[str], list]:
        """The first round: every method samples it alike (initial weights, the seed's first draws), so the
        last one sampled is kept and reused with the RNG state it left, exactly as if sampled again."""
        key = (tuple(prompt), n, seed)
        if self._cached_round is not None and self._cached_round[0] == key:
            torch.set_rng_state(self._cached_round[2])
            return self._attempts(problem, [prompt], n, sampled=self._cached_round[1])
        responses, texts, evals = self._attempts(problem, [prompt], n)
        self._cached_round = (key, (responses, texts), torch.get_rng_state())
        return responses, texts, evals


def _retry_message(feedback: str) -> str:
    return RETRY_TEMPLATE.format(feedback_raw=feedback.strip() or NO_FEEDBACK)


def run_ttsd(cfg: TTSDConfig, evaluator=None) -> SearchResult:
    """`sdpo-fast ttsd`: search the problem of `cfg`; writes output_dir/rounds.jsonl (one line per round,
    as it happens) and output_dir/solution.json (the outcome and the discovered solution)."""
    problem, env = problem_of(cfg)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with Searcher(cfg, env, evaluator=evaluator) as searcher, (cfg.output_dir / "rounds.jsonl").open("w") as out:
        def on_round(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        result = searcher.search(problem, cfg.method, cfg.seed, on_round=on_round)
    outcome = {k: v for k, v in asdict(result).items() if k != "log"}
    write_atomically(cfg.output_dir / "solution.json",
                      json.dumps({"problem": problem, **outcome}, indent=1, default=str) + "\n")
    return result
