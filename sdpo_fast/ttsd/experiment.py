"""The discovery@k experiment: every method on every (problem, seed) at the same attempt budget.

Each finished run is appended to OUTPUT.runs.jsonl at once (a run found there with the same settings is
not repeated, so an interrupted experiment continues). At the end: discovery@k for k = 1..budget per
method, a Markdown table, OUTPUT.json (settings, problems, curves, table, runs) and OUTPUT.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from sdpo_fast.files import write_json
from sdpo_fast.train.metrics import read_metrics
from sdpo_fast.ttsd.config import ExperimentConfig
from sdpo_fast.ttsd.discovery import discovery_at_k, discovery_table, plot_discovery
from sdpo_fast.ttsd.problems import task_problems
from sdpo_fast.ttsd.search import Searcher, SearchResult

log = logging.getLogger(__name__)


def settings_of(cfg: ExperimentConfig) -> dict:
    """What makes two runs comparable: everything but the output path and the problem / seed counts."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("output", "problems", "seeds", "indices", "methods",
                                                              "env_workers", "env_timeout_s", "device")}
    return json.loads(json.dumps(keep, default=str))


def run_record(index: int, result: SearchResult, settings: dict) -> dict:
    """The compact JSON record of one run (per-round rewards and SDPO losses, not the responses)."""
    return {"index": index, "seed": result.seed, "method": result.method, "solved": result.solved,
            "attempts": result.attempts, "generated": result.generated, "rounds": result.rounds,
            "seconds": round(result.seconds, 2), "solution": result.solution,
            "round_success": [sum(r >= 1.0 for r in rec["rewards"]) for rec in result.log],
            "round_mean_reward": [sum(rec["rewards"]) / len(rec["rewards"]) for rec in result.log],
            "update_loss": [rec["update"]["loss"] if rec["update"] else None for rec in result.log],
            "settings": settings}


def run_experiment(cfg: ExperimentConfig, evaluator=None) -> dict:
    """Run (or finish) the experiment of `cfg`; returns the summary written to OUTPUT.json."""
    indices = cfg.problem_indices()
    problems, env = task_problems(cfg.task, cfg.split, max(indices) + 1, cfg.task_options, cfg.feedback)
    settings = settings_of(cfg)
    progress = Path(str(cfg.output) + ".runs.jsonl")
    progress.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["index"], r["seed"], r["method"]): r for r in (read_metrics(progress) if progress.exists() else [])
            if r.get("settings") == settings}
    todo = [(i, s, m) for i in indices for s in range(cfg.seeds) for m in cfg.methods if (i, s, m) not in done]
    if todo:
        with Searcher(cfg, env, evaluator=evaluator) as searcher, progress.open("a") as out:
            for i, s, m in tqdm(todo, desc="ttsd runs", unit="run", dynamic_ncols=True):
                record = run_record(i, searcher.search(problems[i], m, seed=s), settings)
                out.write(json.dumps(record) + "\n")
                out.flush()
                done[(i, s, m)] = record
                log.info("problem %d seed %d %s: %s", i, s, m,
                         f"solved at attempt {record['attempts']}" if record["solved"] else "not solved")
    runs = [done[(i, s, m)] for i in indices for s in range(cfg.seeds) for m in cfg.methods]
    return summarize(cfg, runs, {i: problems[i] for i in indices})


def summarize(cfg: ExperimentConfig, runs: list[dict], problems: dict[int, dict]) -> dict:
    """Curves, table, JSON and PNG of finished runs."""
    ks = list(range(1, cfg.budget + 1))
    n = len(runs) // len(cfg.methods)
    curves = {m: discovery_at_k([r["attempts"] for r in runs if r["method"] == m], ks) for m in cfg.methods}
    shown = sorted({1, *range(cfg.batch, cfg.budget + 1, cfg.batch), cfg.budget})
    table = discovery_table({m: [c[k - 1] for k in shown] for m, c in curves.items()}, shown, n)
    title = (f"{cfg.model} on {cfg.task} {cfg.task_options or ''}: {len(problems)} problems x {cfg.seeds} seeds, "
             f"batch {cfg.batch}, lr {cfg.lr:g}, teacher {cfg.teacher}")
    summary = {"settings": settings_of(cfg), "problems": {str(i): p["prompt"] for i, p in problems.items()},
               "runs_per_method": n, "ks": ks, "discovery": curves, "table": table,
               "runs": [{k: v for k, v in r.items() if k != "settings"} for r in runs]}
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(str(cfg.output) + ".json"), summary, indent=1)
    plot_discovery(curves, ks, n, Path(str(cfg.output) + ".png"), title)
    return summary
