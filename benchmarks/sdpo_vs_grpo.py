"""SDPO vs GRPO on a built-in task at the same number of generations: held-out accuracy and step time.

Runs `sdpo-fast train` once per (algorithm, seed) with identical settings (a YAML config plus the
algorithm and seed), evaluating every `--eval-every` steps, then writes:
- `sdpo_vs_grpo.json` (`--name`): every run's accuracy-vs-generations curve, phase times and per-step
  MECHANISM metrics (reward, response length, all-failed groups, self-teacher diagnostics), and the summary;
- `sdpo_vs_grpo.png`: mean held-out accuracy (with per-seed points) against generations;
- a Markdown table on stdout: accuracy at each checkpoint (mean over seeds), and the median step time of
  each algorithm, split into generation and training (score + update). Runs that went side by side share
  the CPU, so their times compare only within one batch of `--jobs`; `sdpo-fast bench step` measures the
  step-time ratio properly (interleaved, one process).

    python benchmarks/sdpo_vs_grpo.py --config configs/demo.yaml --seeds 0 1 2 --jobs 2

`--prior FILE ...` adds the runs of earlier results files of the same setting (checked: the same model,
task, sampling, optimizer, teacher context, evaluation and budget), so only the missing (algorithm, seed)
pairs run; `--rename OLD=NEW` gives their algorithms today's names. Each such run keeps where it came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from sdpo_fast.bench.common import device_name, git_commit
from sdpo_fast.files import save_figure, write_json

TRAIN_PHASES = ("time/score_s", "time/update_s")
# Per-step values kept for every run: what the self-teacher does (sdpo_fast.algorithm.diagnostics), how
# many groups fail entirely (groups/*: runs with a teacher) or have a single reward value
# (reward/zero_std_group_frac, every run: GRPO's advantage is zero there), and response length.
MECHANISM = ("reward/mean", "response/length_mean", "groups/all_failed_frac", "reward/zero_std_group_frac",
             "teacher/seq_adv_auc", "teacher/answer_adv_failed", "teacher/answer_adv_success",
             "teacher/answer_div_concentration", "teacher/all_failed_teacher_frac", "teacher/all_failed_div",
             "reprompt/feedback_used_fraction")
# Config keys that must agree for runs of different results files to share one table (the loss section
# is what varies between algorithms, and its spelling changed when loss.mode replaced full_logit_distillation).
COMPARABLE = ("model", "task", "task_options", "teacher", "tau", "max_steps", "prompts_per_step",
              "rollouts_per_prompt", "sampling", "optim", "reprompt", "eval")


def run(config: Path, algorithm: str, seed: int, out: Path, extra: list[str], max_steps: int) -> list[dict]:
    """One training run of `max_steps` through the CLI (one thread, so that runs can go side by side);
    returns its metrics rows up to `max_steps`. A run already in `out` that got that far is reused (runs are
    deterministic and the learning rate is constant after warm-up, so a longer run's first steps are the
    same as a shorter run's)."""
    run_dir = out / f"{algorithm}-seed{seed}"
    metrics = run_dir / "metrics.jsonl"

    def rows() -> list[dict]:
        return [r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] <= max_steps]

    if metrics.exists() and any(r["step"] == max_steps and "eval/accuracy" in r for r in rows()):
        print(f"reusing {run_dir}", flush=True)
        return rows()
    # Only the metrics are needed: no checkpoints (2.2 GB each for SmolLM2-135M) and no model export.
    cmd = [sys.executable, "-m", "sdpo_fast.cli", "train", "--config", str(config), "--algorithm", algorithm,
           "--seed", str(seed), "--output-dir", str(run_dir), "--max-steps", str(max_steps),
           "--keep-checkpoints", "0", "--no-export", "--overwrite", *extra]  # a shorter run there is redone
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return rows()


def curve(rows: list[dict], generations_per_step: int) -> tuple[list[int], list[float]]:
    """(generations, held-out accuracy) at every evaluation of a run."""
    points = [(r["step"] * generations_per_step, r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return [g for g, _ in points], [a for _, a in points]


def per_step_values(rows: list[dict]) -> dict[str, list[float]]:
    """MECHANISM metrics per training step (those the run logged)."""
    steps = [r for r in rows if "time/step_s" in r]
    return {k: [r[k] for r in steps] for k in MECHANISM if all(k in r for r in steps)}


def step_times(rows: list[dict]) -> dict[str, float]:
    """Median seconds per step: total, generation, and training (score + update)."""
    steps = [r for r in rows if "time/step_s" in r]
    return {"step_s": float(np.median([r["time/step_s"] for r in steps])),
            "generate_s": float(np.median([r["time/generate_s"] for r in steps])),
            "train_s": float(np.median([sum(r[k] for k in TRAIN_PHASES) for r in steps])),
            "response_len": float(np.mean([r["response/length_mean"] for r in steps]))}


def load_prior(paths: list[Path], cfg: dict, max_steps: int, rename: dict[str, str]) -> dict[str, dict]:
    """The runs of earlier results files, keyed "algorithm/seed" with algorithms renamed by `rename`; each
    run gets a "source" (file, commit, date, command, original algorithm name). ValueError when a file's
    setting differs from `cfg` in a COMPARABLE key or in `max_steps`, or when two files disagree on a run."""
    runs: dict[str, dict] = {}
    for path in paths:
        record = json.loads(path.read_text())
        prior_cfg = {**record["config"], "max_steps": record["max_steps"]}
        mine = {**cfg, "max_steps": max_steps}
        differ = [k for k in COMPARABLE if prior_cfg.get(k) != mine.get(k)]
        if differ:
            raise ValueError(f"--prior {path}: its runs differ from --config in {', '.join(differ)}")
        for run_ in record["runs"].values():
            algorithm = rename.get(run_["algorithm"], run_["algorithm"])
            key = f"{algorithm}/{run_['seed']}"
            if key in runs and runs[key]["accuracy"] != run_["accuracy"]:
                raise ValueError(f"--prior {path}: run {key} differs from the one in {runs[key]['source']['file']}")
            source = {"file": str(path), "commit": record["commit"], "date": record["date"],
                      "command": record["command"], "algorithm": run_["algorithm"]}
            runs.setdefault(key, {**run_, "algorithm": algorithm, "source": source})
    return runs


def parse_rename(pairs: list[str]) -> dict[str, str]:
    """{"old": "new"} from ["old=new", ...]; ValueError naming --rename on a malformed pair."""
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not (sep and old and new):
            raise ValueError(f"--rename: expected OLD=NEW, got {pair!r}")
        out[old] = new
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="training YAML shared by every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["sdpo", "grpo", "blend"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="sdpo_vs_grpo", help="file name of the results (.json, .png)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/sdpo_vs_grpo"))
    parser.add_argument("--max-steps", type=int, help="steps per run (default: the config's max_steps)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one thread each)")
    parser.add_argument("--prior", type=Path, nargs="+", default=[],
                        help="results JSON files whose runs (same setting) are reused instead of rerun")
    parser.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                        help="algorithm names of --prior runs to replace, e.g. sdpo=sdpo_token")
    args, extra = parser.parse_known_args()
    cfg = yaml.safe_load(args.config.read_text())
    per_step = cfg.get("prompts_per_step", 8) * cfg.get("rollouts_per_prompt", 4)
    max_steps = args.max_steps or cfg["max_steps"]
    try:
        prior = load_prior(args.prior, cfg, max_steps, parse_rename(args.rename))
    except ValueError as e:
        parser.error(str(e))

    wanted = [(a, s) for a in args.algorithms for s in args.seeds]
    jobs = [(a, s) for a, s in wanted if f"{a}/{s}" not in prior]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda job: run(args.config, *job, args.runs_dir, extra, max_steps), jobs)
        fresh = {}
        for (algorithm, seed), rows in zip(jobs, results):
            gens, acc = curve(rows, per_step)
            fresh[f"{algorithm}/{seed}"] = {"algorithm": algorithm, "seed": seed, "generations": gens,
                                            "accuracy": acc, "times": step_times(rows),
                                            "per_step": per_step_values(rows)}
    runs = {f"{a}/{s}": {**prior, **fresh}[f"{a}/{s}"] for a, s in wanted}

    table = summarise(runs, args.algorithms)
    record = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": device_name("cpu"),
              "command": " ".join(sys.argv), "config": cfg, "max_steps": max_steps, "jobs": args.jobs,
              "prior": [str(p) for p in args.prior],
              "runs": runs, "summary": table}
    write_json(args.out / f"{args.name}.json", record)
    plot(runs, args.algorithms, args.out / f"{args.name}.png", cfg.get("task", "?"))
    print(markdown(table, args.algorithms))


def summarise(runs: dict, algorithms: list[str]) -> dict:
    """Mean / min / max accuracy per checkpoint, median step times, and the mean over seeds and steps of
    each MECHANISM metric, per algorithm."""
    out = {}
    for algorithm in algorithms:
        mine = [r for r in runs.values() if r["algorithm"] == algorithm]
        acc = np.array([r["accuracy"] for r in mine])
        per_step = {k: float(np.nanmean([v for r in mine for v in r.get("per_step", {}).get(k, [])]))
                    for k in MECHANISM if any(k in r.get("per_step", {}) for r in mine)}
        out[algorithm] = {"generations": mine[0]["generations"], "accuracy_mean": acc.mean(0).tolist(),
                          "accuracy_min": acc.min(0).tolist(), "accuracy_max": acc.max(0).tolist(),
                          **{k: float(np.median([r["times"][k] for r in mine])) for k in mine[0]["times"]},
                          "per_step_mean": per_step}
    return out


def markdown(table: dict, algorithms: list[str]) -> str:
    gens = table[algorithms[0]]["generations"]
    lines = ["| generations | " + " | ".join(f"{a} accuracy (mean [min, max])" for a in algorithms) + " |",
             "|---" * (len(algorithms) + 1) + "|"]
    for i, g in enumerate(gens):
        cells = [f"{table[a]['accuracy_mean'][i]:.3f} [{table[a]['accuracy_min'][i]:.3f}, "
                 f"{table[a]['accuracy_max'][i]:.3f}]" for a in algorithms]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "| algorithm | step s | generate s | train s (score+update) | response tokens |",
              "|---|---|---|---|---|"]
    for a in algorithms:
        t = table[a]
        lines.append(f"| {a} | {t['step_s']:.1f} | {t['generate_s']:.1f} | {t['train_s']:.1f} | "
                     f"{t['response_len']:.1f} |")
    keys = [k for k in MECHANISM if any(k in table[a]["per_step_mean"] for a in algorithms)]
    lines += ["", "| mean over seeds and steps | " + " | ".join(algorithms) + " |",
              "|---" * (len(algorithms) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{table[a]['per_step_mean'][k]:.3f}" if k in table[a]["per_step_mean"]
                                              else "-" for a in algorithms) + " |")
    return "\n".join(lines)


def plot(runs: dict, algorithms: list[str], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Per-seed curves are thin and shifted sideways by algorithm, so that equal accuracies stay visible.
    span = max(g for r in runs.values() for g in r["generations"]) or 1
    for i, (algorithm, color) in enumerate(zip(algorithms, ("tab:blue", "tab:orange", "tab:green"))):
        mine = [r for r in runs.values() if r["algorithm"] == algorithm]
        shift = (i - (len(algorithms) - 1) / 2) * span / 80
        for r in mine:
            ax.plot(np.array(r["generations"]) + shift, r["accuracy"], color=color, alpha=0.35, lw=0.8,
                    ls="--", marker=".", ms=5)
        ax.plot(mine[0]["generations"], np.mean([r["accuracy"] for r in mine], 0), color=color, marker="o",
                label=f"{algorithm} (mean of {len(mine)} seeds; dashed: each seed)")
    ax.set_xlabel("generations (rollouts sampled)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"SDPO vs GRPO on {task}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
