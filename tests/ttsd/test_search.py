"""Test-time search on a tiny random model with forced outcomes: early stop, budget exhaustion, restored
weights, discovery@k by hand, the experiment's files and resumption, and the command-line settings."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from sdpo_fast.cli import parse
from sdpo_fast.envs import Evaluation
from sdpo_fast.ttsd import (ExperimentConfig, SearchOptions, Searcher, TTSDConfig, discovery_at_k, file_problem,
                            run_experiment, run_ttsd, task_problems)

TINY = dict(model="tiny-random", batch=4, budget=10, max_new_tokens=6, lr=1e-3, env_workers=1)
PROBLEMS, ENV = task_problems("arithmetic", "heldout", 2)


class Forced:
    """Stands in for the environment: attempt number `success_at` (1-based, counted over the search's
    evaluate calls) is correct, every other attempt fails with feedback."""

    def __init__(self, success_at: int | None = None):
        self.success_at, self.seen = success_at, 0

    def evaluate(self, problems, responses):
        out = []
        for _ in responses:
            self.seen += 1
            out.append(Evaluation(1.0) if self.seen == self.success_at else Evaluation(0.0, "Your answer is wrong."))
        return out

    def close(self):
        pass


class Hashed(Forced):
    """A response is correct when its text hashes to 0 mod 5: deterministic, and about 1 in 5 attempts."""

    def evaluate(self, problems, responses):
        return [Evaluation(1.0) if zlib.crc32(r.encode()) % 5 == 0 else Evaluation(0.0, "Wrong.") for r in responses]


@pytest.fixture(scope="module")
def searcher():
    with Searcher(SearchOptions(**TINY), ENV, evaluator=Forced()) as s:
        yield s


def _state(s: Searcher) -> dict[str, torch.Tensor]:
    state = {f"policy.{k}": v.clone() for k, v in s.trainer.policy.state_dict().items()}
    state.update({f"teacher.{k}": v.clone() for k, v in s.trainer.teacher_policy.state_dict().items()})
    return state


@pytest.mark.parametrize("method", ["sdpo", "best-of-k", "multi-turn"])
def test_success_in_the_first_round_stops_at_once(searcher, method):
    searcher.trainer.evaluator = Forced(success_at=3)
    result = searcher.search(PROBLEMS[0], method, seed=0)
    assert (result.solved, result.attempts, result.rounds, result.generated) == (True, 3, 1, 4)
    assert result.solution == result.log[0]["responses"][2]
    assert result.log[0]["update"] is None  # no SDPO step once solved


def test_budget_exhaustion_reports_failure(searcher):
    searcher.trainer.evaluator = Forced(success_at=None)
    sdpo = searcher.search(PROBLEMS[0], "sdpo", seed=0)
    assert (sdpo.solved, sdpo.attempts, sdpo.solution, sdpo.generated) == (False, None, None, 10)
    assert [len(r["rewards"]) for r in sdpo.log] == [4, 4, 2]  # the last round takes what is left
    updates = [r["update"] for r in sdpo.log]
    assert updates[0]["grad_norm"] > 0 and updates[1]["grad_norm"] > 0 and updates[2] is None
    assert updates[0]["reprompt/feedback_used_fraction"] == 1.0  # the teacher saw the feedback

    best = searcher.search(PROBLEMS[0], "best-of-k", seed=0)
    assert (best.solved, best.generated, [len(r["rewards"]) for r in best.log]) == (False, 10, [4, 6])
    assert best.log[0]["responses"] == sdpo.log[0]["responses"]  # equal seeds share the first round

    searcher.trainer.evaluator = Forced(success_at=7)  # second round, third conversation
    turns = searcher.search(PROBLEMS[0], "multi-turn", seed=0)
    assert (turns.solved, turns.attempts, turns.rounds) == (True, 7, 2)


def test_weights_and_optimizer_restored_between_problems(searcher):
    initial = _state(searcher)
    searcher.trainer.evaluator = Forced(success_at=None)
    first = searcher.search(PROBLEMS[0], "sdpo", seed=3)
    moved = _state(searcher)
    assert any(not torch.equal(moved[k], initial[k]) for k in initial if k.startswith("policy."))
    assert any(not torch.equal(moved[k], initial[k]) for k in initial if k.startswith("teacher."))  # EMA moved
    assert searcher.trainer.optimizer.state  # Adam moments exist

    searcher.search(PROBLEMS[1], "sdpo", seed=4)  # another problem in between
    searcher.restore()
    assert all(torch.equal(v, initial[k]) for k, v in _state(searcher).items())  # bitwise
    assert not searcher.trainer.optimizer.state
    again = searcher.search(PROBLEMS[0], "sdpo", seed=3)
    assert [r["responses"] for r in again.log] == [r["responses"] for r in first.log]
    assert [r["update"] for r in again.log] == [r["update"] for r in first.log]


def test_discovery_at_k_hand_worked():
    # six runs: first successes at attempts 1, 3, 3 and 8; two unsolved
    runs = [1, 3, None, 8, 3, None]
    assert discovery_at_k(runs, [1, 2, 3, 7, 8, 32]) == [1 / 6, 1 / 6, 3 / 6, 3 / 6, 4 / 6, 4 / 6]
    assert discovery_at_k([None, None], [5]) == [0.0]
    with pytest.raises(ValueError, match="first_success"):
        discovery_at_k([0, 2], [1])
    with pytest.raises(ValueError, match="ks"):
        discovery_at_k([1], [0])


def test_command_writes_solution_and_rounds(tmp_path):
    cfg = TTSDConfig(**TINY, method="sdpo", output_dir=tmp_path, index=1)
    result = run_ttsd(cfg, evaluator=Forced(success_at=6))
    assert (result.solved, result.attempts) == (True, 6)
    saved = json.loads((tmp_path / "solution.json").read_text())
    assert saved["solved"] and saved["attempts"] == 6 and saved["solution"] == result.solution
    assert saved["problem"] == PROBLEMS[1]
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["responses"] for r in rounds] == [r["responses"] for r in result.log]
    # round 1 failed and took an SDPO step (the one in the result's log); round 2 solved it: no step
    assert rounds[0]["update"]["loss"] == result.log[0]["update"]["loss"] and rounds[0]["update"]["grad_norm"] > 0
    assert rounds[1]["update"] is None


def test_experiment_table_plot_and_resume(tmp_path):
    out = tmp_path / "exp"
    cfg = ExperimentConfig(**{**TINY, "budget": 6, "batch": 3}, problems=2, seeds=2, output=out)
    summary = run_experiment(cfg, evaluator=Hashed())
    assert summary["runs_per_method"] == 4 and len(summary["runs"]) == 12
    for method, curve in summary["discovery"].items():
        attempts = [r["attempts"] for r in summary["runs"] if r["method"] == method]
        assert curve == discovery_at_k(attempts, list(range(1, 7)))
    assert "| 6 |" in summary["table"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.with_suffix(".json").read_text())["discovery"] == summary["discovery"]
    lines = (tmp_path / "exp.runs.jsonl").read_text().splitlines()
    assert len(lines) == 12
    again = run_experiment(cfg, evaluator=Hashed())  # everything done: nothing is run again
    assert (tmp_path / "exp.runs.jsonl").read_text().splitlines() == lines
    assert again["discovery"] == summary["discovery"]


def test_settings_fail_fast_with_clear_messages(tmp_path, capsys):
    for cls, args, message in ((TTSDConfig, ["--batch", "0"], "batch"), (TTSDConfig, ["--lr", "-1"], "optim.lr"),
                               (ExperimentConfig, ["--methods", "sdpo", "beam"], "methods")):
        with pytest.raises(SystemExit):
            parse(cls, args, prog="t")
        assert message in capsys.readouterr().err
    cfg = parse(TTSDConfig, ["--method", "multi-turn", "--budget", "64", "--adv-clip", "None"], prog="t")
    assert (cfg.method, cfg.budget, cfg.adv_clip, cfg.topk, cfg.alpha) == ("multi-turn", 64, None, 20, 1.0)
    with pytest.raises(ValueError, match="adv_clip"):
        Searcher(SearchOptions(**TINY, alpha=0.5), ENV, evaluator=Forced())

    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4", "kind": "number"}) + "\n\n"
                    + json.dumps({"prompt": "Spell cat backwards.", "answer": "tac", "kind": "text"}) + "\n")
    problem, env = file_problem(path, 1, "answer")
    assert problem["answer"] == "tac" and env.evaluate(problem, "Answer: tac").reward == 1.0
    with pytest.raises(ValueError, match="line"):
        file_problem(path, 2, "answer")
    path.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        file_problem(path, 0, "answer")
