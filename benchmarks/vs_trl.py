"""sdpo_fast vs TRL's SDPO trainer: the same SDPO run in both engines, interleaved, several seeds.

Same model, task, prompts (the same problems in the same order), chat template, teacher-prompt templates,
sampling, loss, optimizer, schedule and EMA teacher in `sdpo_fast.train.Trainer` and in TRL's
`trl.experimental.sdpo.SDPOTrainer` (its own loss, materialised logits). `OPTION_MAP` below lists every
option mapped and what cannot be matched. Each run is a fresh child process (so its peak RSS is its own);
runs go A, B, A, B (seed by seed), so that machine noise hits both engines alike. Per run and step: the
step's wall time split into generation and the rest (reward, teacher contexts, scoring, backward,
optimizer, EMA; evaluation excluded), mean reward and response length; held-out accuracy (greedy, the
same evaluation code for both) every `--eval-every` steps; the child's peak RSS.

Writes `vs_trl.json` and `vs_trl.png` under `--out` and prints the Markdown tables of the README.

    python benchmarks/vs_trl.py                       # SmolLM2-135M, 4 steps x 2 seeds (~25 min on 2 busy cores)
    python benchmarks/vs_trl.py --seeds 0 1 2 3 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sdpo_fast.bench.memory import peak_rss_bytes

ENGINES = ("sdpo_fast", "trl")

# Every setting of the run and how each engine receives it. The run's values are in `Setting`.
OPTION_MAP = [
    ("model", "model (sdpo_fast.models.load_model)", "model object from the same load_model, float32"),
    ("task / prompts", "task, task_options, seed -> Task.batch(step)",
     "Dataset of the same problems in step order, shuffle_dataset=False"),
    ("chat template", "tokenizer.apply_chat_template(add_generation_prompt=True)", "the same, conversational prompts"),
    ("prompts per step x rollouts", "prompts_per_step, rollouts_per_prompt",
     "num_generations; per_device_train_batch_size x gradient_accumulation_steps = prompts x rollouts"),
    ("micro-batch", "micro_batch_size", "per_device_train_batch_size (steps_per_generation = accumulation steps)"),
    ("response cap", "sampling.max_new_tokens", "max_completion_length"),
    ("temperature / top-p / top-k", "sampling.temperature, top_p; top_k off",
     "temperature, top_p, top_k=0 (also divides the loss logits in both)"),
    ("end of response", "eos_ids(tokenizer) (kept in the response)",
     "model.generation_config.eos_token_id = the same ids (kept in the completion mask)"),
    ("reward", "AnswerEnv of the task", "reward function calling the same AnswerEnv"),
    ("loss", "loss.mode=sdpo (full-logit), topk=None, alpha",
     "distillation_mode=full_logits, distillation_alpha, distillation_weight=1"),
    ("importance clip", "loss.is_clip (on-policy: weight 1)", "distillation_is_clip (no old log-probs: unused)"),
    ("aggregation", "loss.agg_mode=seq-mean-token-mean: / rows with a teacher",
     "per-row token mean, / ALL rows (masked rows count 0) -- NOT matchable: TRL's loss is ours x "
     "(rows with a teacher / all rows)"),
    ("teacher", "teacher=ema, tau", "teacher_model_kind=ema, teacher_update_rate, teacher_sync_steps=1"),
    ("demonstrations", "reprompt.success_reward_threshold, self_demonstration=False, "
     "remove_thinking_from_demonstration", "the same three fields (TRL also strips whitespace around the "
     "demonstration; sdpo_fast keeps it: identical unless a response starts or ends with whitespace)"),
    ("teacher templates", "RepromptConfig templates (the reference's)",
     "reprompt_template, solution_template, feedback_template set to the same strings"),
    ("environment feedback", "reprompt.include_environment_feedback=False",
     "include_environment_feedback=False -- feedback itself NOT matchable: TRL reads a per-prompt dataset "
     "column (privileged_context), sdpo_fast the per-rollout environment feedback"),
    ("teacher prompt cap", "reprompt.max_reprompt_len (left truncation)", "max_reprompt_len (left truncation)"),
    ("student prompt cap", "none", "max_prompt_length=None"),
    ("optimizer", "AdamW(lr, betas, weight_decay on every parameter, eps 1e-8)",
     "the same torch AdamW object passed as `optimizers` (TRL's default would skip decay on biases/norms)"),
    ("schedule", "linear warm-up (s+1)/(w+1), then constant", "the same LambdaLR passed as `optimizers`"),
    ("grad clip", "optim.grad_clip", "max_grad_norm"),
    ("precision", "float32, no activation checkpointing",
     "bf16=False, gradient_checkpointing=False (TRL's defaults: bf16 on, checkpointing on)"),
    ("KL to reference / entropy", "none (kl_coef=0)", "beta=0"),
    ("evaluation", "sdpo_fast.train.evaluate.heldout_correct (greedy)", "the same function on TRL's model"),
]


@dataclass
class Setting:
    """The run both engines make."""

    model: str = "smollm2-135m"
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: {"digits": "1"})
    steps: int = 4
    prompts: int = 4
    rollouts: int = 8
    micro_batch: int = 8
    max_new_tokens: int = 48
    temperature: float = 0.7
    lr: float = 1e-5
    warmup_steps: int = 2
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    alpha: float = 0.5
    tau: float = 0.05
    is_clip: float = 2.0
    eval_every: int = 2
    eval_problems: int = 32
    threads: int = 1


# ---------------------------------------------------------------------------------------------------------
# Children: one training run each, returning per-step rows and the peak RSS.

def run_sdpo_fast(s: Setting, seed: int, out_dir: Path) -> dict:
    """One sdpo_fast run through its Trainer; per-step rows from its metrics.jsonl."""
    from sdpo_fast.algorithm.config import LossConfig, RepromptConfig
    from sdpo_fast.rollout.sampling import SamplingConfig
    from sdpo_fast.train.config import EvalOptions, OptimOptions, TrainConfig
    from sdpo_fast.train.trainer import Trainer

    cfg = TrainConfig(
        model=s.model, task=s.task, task_options=dict(s.task_options), teacher="ema", tau=s.tau,
        max_steps=s.steps, output_dir=out_dir, seed=seed, device="cpu", prompts_per_step=s.prompts,
        rollouts_per_prompt=s.rollouts, micro_batch_size=s.micro_batch, generation_batch_size=s.prompts * s.rollouts,
        env_workers=1, keep_checkpoints=0, export=False, overwrite=True,
        sampling=SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0),
        optim=OptimOptions(lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, grad_clip=s.grad_clip),
        loss=LossConfig(mode="sdpo", alpha=s.alpha, topk=None, is_clip=s.is_clip,
                         agg_mode="seq-mean-token-mean"),
        reprompt=RepromptConfig(include_environment_feedback=False),
        eval=EvalOptions(problems=s.eval_problems, every=s.eval_every))
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps, evals = [], {}
    for r in rows:
        if "eval/accuracy" in r:
            evals[r["step"]] = r["eval/accuracy"]
        if "time/step_s" in r:
            steps.append({"step": r["step"], "generate_s": r["time/generate_s"],
                          "train_s": r["time/step_s"] - r["time/generate_s"], "step_s": r["time/step_s"],
                          "reward_mean": r["reward/mean"], "response_len": r["response/length_mean"],
                          "reprompt_frac": r.get("reprompt/reprompt_fraction")})
    return {"steps": steps, "eval": evals, "peak_rss_mb": peak_rss_bytes() / 2**20}


def trl_trainer(s: Setting, seed: int, out_dir: Path, model, tokenizer, task, callbacks=()):
    """TRL's SDPOTrainer set up as `run_sdpo_fast`'s Trainer (see OPTION_MAP), with per-step timers."""
    import torch
    from datasets import Dataset
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from sdpo_fast.algorithm.reprompt import FEEDBACK_TEMPLATE, REPROMPT_TEMPLATE, SOLUTION_TEMPLATE
    from sdpo_fast.train.evaluate import eos_ids

    problems = [p for step in range(1, s.steps + 1) for p in task.batch(step, s.prompts, seed)]
    dataset = Dataset.from_dict({"prompt": [task.messages(p) for p in problems],
                                 "problem": [json.dumps(p) for p in problems]})

    def reward(completions, problem, **kwargs) -> list[float]:
        return [task.env.evaluate(json.loads(p), c[0]["content"]).reward for c, p in zip(completions, problem)]

    model.generation_config.eos_token_id = eos_ids(tokenizer)
    accumulation = s.prompts * s.rollouts // s.micro_batch
    config = SDPOConfig(
        output_dir=str(out_dir), seed=seed, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=s.steps, shuffle_dataset=False,
        per_device_train_batch_size=s.micro_batch, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_generations=s.rollouts, max_prompt_length=None,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0,
        max_grad_norm=s.grad_clip, beta=0.0, distillation_mode="full_logits", distillation_alpha=s.alpha,
        distillation_weight=1.0, distillation_is_clip=s.is_clip, teacher_model_kind="ema",
        teacher_update_rate=s.tau, teacher_sync_steps=1, success_reward_threshold=0.5,
        dont_reprompt_on_self_success=True, remove_thinking_from_demonstration=True,
        include_environment_feedback=False, environment_feedback_only_without_solution=True,
        reprompt_template=REPROMPT_TEMPLATE, solution_template=SOLUTION_TEMPLATE, feedback_template=FEEDBACK_TEMPLATE,
        max_reprompt_len=10240)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    w = s.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (w + 1)) if w else 1.0)

    class Timed(SDPOTrainer):
        """Records generation time, rewards and completion lengths of each generation."""

        def __init__(self, *args, **kwargs):
            self.log_rows: list[dict] = []
            super().__init__(*args, **kwargs)

        def _generate(self, prompt_ids):
            start = time.perf_counter()
            prompts, completions = super()._generate(prompt_ids)
            self.log_rows.append({"generate_s": time.perf_counter() - start,
                                  "response_len": float(np.mean([len(c) for c in completions]))})
            return prompts, completions

        def _calculate_rewards(self, *args, **kwargs):
            rewards = super()._calculate_rewards(*args, **kwargs)
            self.log_rows[-1]["reward_mean"] = float(rewards.sum(1).mean())
            return rewards

    return Timed(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                 optimizers=(optimizer, scheduler), callbacks=list(callbacks))


def run_trl(s: Setting, seed: int, out_dir: Path) -> dict:
    """One run of TRL's SDPOTrainer; step time = on_step_begin to the next, minus the evaluation in between."""
    import transformers

    from sdpo_fast.envs import BatchEvaluator
    from sdpo_fast.models import load_model, load_tokenizer
    from sdpo_fast.train.data import load_task
    from sdpo_fast.train.evaluate import heldout_correct

    transformers.set_seed(seed)
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model, seed=seed)
    task = load_task(s.task, seed=seed, heldout_size=max(s.eval_problems, 1), options=dict(s.task_options))
    evaluator = BatchEvaluator(task.env, workers=1)
    evals: dict[int, float] = {}
    bounds: list[tuple[float, float]] = []  # (step start, evaluation seconds at its end)

    def evaluate(step: int, model) -> float:
        start = time.perf_counter()
        correct = heldout_correct(model, tokenizer, task, task.heldout[: s.eval_problems], evaluator,
                                  max_new_tokens=s.max_new_tokens, batch_size=64)
        evals[step] = correct / max(s.eval_problems, 1)
        return time.perf_counter() - start

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            bounds.append((time.perf_counter(), 0.0))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step == s.steps or (s.eval_every and step % s.eval_every == 0):
                bounds[-1] = (bounds[-1][0], evaluate(step, model))

    trainer = trl_trainer(s, seed, out_dir, model, tokenizer, task, callbacks=[Clock()])
    evaluate(0, trainer.model)
    trainer.train()
    end = time.perf_counter()
    evaluator.close()
    steps = []
    for k, ((start, eval_s), gen) in enumerate(zip(bounds, trainer.log_rows), start=1):
        stop = bounds[k][0] if k < len(bounds) else end
        step_s = stop - start - eval_s
        steps.append({"step": k, "generate_s": gen["generate_s"], "train_s": step_s - gen["generate_s"],
                      "step_s": step_s, "reward_mean": gen["reward_mean"], "response_len": gen["response_len"]})
    return {"steps": steps, "eval": evals, "peak_rss_mb": peak_rss_bytes() / 2**20}


def child(engine: str, s: Setting, seed: int, runs_dir: Path, result: Path) -> None:
    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(s.threads)
    out_dir = runs_dir / f"{engine}-seed{seed}"
    start = time.perf_counter()
    record = (run_sdpo_fast if engine == "sdpo_fast" else run_trl)(s, seed, out_dir)
    record["wall_s"] = time.perf_counter() - start
    result.write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------------
# Parent: interleaved runs, summary, plot.

def launch(engine: str, s: Setting, seed: int, runs_dir: Path) -> dict:
    """Run one (engine, seed) in a fresh interpreter and return its record, kept as record.json in the run's
    directory; a record of the same setting already there is reused (an interrupted sweep resumes)."""
    saved = runs_dir / f"{engine}-seed{seed}" / "record.json"
    if saved.exists():
        record = json.loads(saved.read_text())
        if record.get("setting") == asdict(s):
            print(f"reusing {saved}", flush=True)
            return record
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", engine, "--seed", str(seed), "--runs-dir", str(runs_dir),
               "--setting", json.dumps(asdict(s)), "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "TOKENIZERS_PARALLELISM": "false"}
        print(f"$ {engine} seed {seed}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        record = {**json.loads(result.read_text()), "setting": asdict(s), "load_avg_1min": os.getloadavg()[0]}
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(record))
    return record


def summarise(runs: dict, s: Setting) -> dict:
    """Per engine: medians over every (seed, step) of the phase times, mean peak RSS, mean accuracy per
    evaluation step; and the sdpo_fast / TRL ratios."""
    out: dict = {}
    for engine in ENGINES:
        mine = [r for r in runs.values() if r["engine"] == engine]
        steps = [row for r in mine for row in r["steps"]]
        eval_steps = sorted({int(k) for r in mine for k in r["eval"]})
        out[engine] = {
            "step_s": float(np.median([x["step_s"] for x in steps])),
            # Each step's non-generation time over the same step's generation time: generation is the same
            # Hugging Face generate call in both engines, so this ratio cancels the machine's load at the time.
            "train_per_generate": float(np.median([x["train_s"] / x["generate_s"] for x in steps])),
            "generate_s": float(np.median([x["generate_s"] for x in steps])),
            "train_s": float(np.median([x["train_s"] for x in steps])),
            "peak_rss_mb": float(np.mean([r["peak_rss_mb"] for r in mine])),
            "eval_steps": eval_steps,
            "accuracy_mean": [float(np.mean([r["eval"][str(k)] for r in mine])) for k in eval_steps],
            "reward_mean_per_step": [float(np.mean([r["steps"][i]["reward_mean"] for r in mine]))
                                     for i in range(s.steps)],
            "response_len_per_step": [float(np.mean([r["steps"][i]["response_len"] for r in mine]))
                                      for i in range(s.steps)],
        }
    a, b = out["sdpo_fast"], out["trl"]
    out["ratio_sdpo_fast_over_trl"] = {k: a[k] / b[k] for k in ("step_s", "generate_s", "train_s",
                                                                  "train_per_generate", "peak_rss_mb")}
    return out


def markdown(runs: dict, summary: dict, s: Setting) -> str:
    a, b, r = summary["sdpo_fast"], summary["trl"], summary["ratio_sdpo_fast_over_trl"]
    lines = ["| per step (median over seeds x steps) | sdpo_fast | TRL SDPOTrainer | sdpo_fast / TRL |",
             "|---|---|---|---|"]
    for key, name in (("step_s", "step s"), ("generate_s", "generation s"), ("train_s", "scoring + update s")):
        lines.append(f"| {name} | {a[key]:.2f} | {b[key]:.2f} | {r[key]:.2f}x |")
    lines.append(f"| peak RSS MB (mean over seeds) | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | "
                 f"{r['peak_rss_mb']:.2f}x |")
    lines.append(f"| scoring + update / generation of the same step (median) | {a['train_per_generate']:.2f} | "
                 f"{b['train_per_generate']:.2f} | {r['train_per_generate']:.2f}x |")
    lines += ["", "| engine | seed | held-out accuracy at steps " + ", ".join(map(str, a["eval_steps"])) +
              " | reward per step | response tokens per step |", "|---|---|---|---|---|"]
    for run in runs.values():
        acc = " -> ".join(f"{run['eval'][str(k)]:.3f}" for k in a["eval_steps"])
        rew = ", ".join(f"{x['reward_mean']:.2f}" for x in run["steps"])
        length = ", ".join(f"{x['response_len']:.1f}" for x in run["steps"])
        lines.append(f"| {run['engine']} | {run['seed']} | {acc} | {rew} | {length} |")
    for engine, t in (("sdpo_fast", a), ("trl", b)):
        lines.append(f"| {engine} | mean | " + " -> ".join(f"{x:.3f}" for x in t["accuracy_mean"]) + " | "
                     + ", ".join(f"{x:.2f}" for x in t["reward_mean_per_step"]) + " | "
                     + ", ".join(f"{x:.1f}" for x in t["response_len_per_step"]) + " |")
    return "\n".join(lines)


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdpo_fast.files import save_figure

    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, color in zip(ENGINES, ("tab:blue", "tab:orange")):
        for run in (r for r in runs.values() if r["engine"] == engine):
            steps = sorted(int(k) for k in run["eval"])
            acc_ax.plot(steps, [run["eval"][str(k)] for k in steps], color=color, alpha=0.35, marker=".")
        acc_ax.plot(summary[engine]["eval_steps"], summary[engine]["accuracy_mean"], color=color, marker="o",
                    label=f"{engine} (mean)")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="accuracy")
    acc_ax.legend()
    acc_ax.grid(alpha=0.3)
    x = np.arange(len(ENGINES))
    gen = [summary[e]["generate_s"] for e in ENGINES]
    rest = [summary[e]["train_s"] for e in ENGINES]
    time_ax.bar(x, gen, label="generation")
    time_ax.bar(x, rest, bottom=gen, label="scoring + update")
    time_ax.set_xticks(x, ENGINES)
    time_ax.set(ylabel="seconds per step (median)", title="step time")
    time_ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=Setting.steps)
    parser.add_argument("--model", default=Setting.model)
    parser.add_argument("--threads", type=int, default=Setting.threads, help="torch threads of each run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_trl"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/vs_trl"))
    parser.add_argument("--report", action="store_true", help="only recompute the summary, plot and tables of "
                        "an existing --out/vs_trl.json")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Setting(**json.loads(args.setting)), args.seed, args.runs_dir, args.result)
        return
    if args.report:
        report(args.out / "vs_trl.json")
        return
    if args.steps < 1 or any(seed < 0 for seed in args.seeds):
        raise SystemExit("vs_trl.py: error: --steps must be >= 1 and --seeds >= 0")
    s = Setting(model=args.model, steps=args.steps, threads=args.threads)

    from sdpo_fast.bench.common import device_name, git_commit
    from sdpo_fast.files import write_json

    runs = {}
    for seed in args.seeds:  # A, B, A, B
        for engine in ENGINES:
            record = {k: v for k, v in launch(engine, s, seed, args.runs_dir).items() if k != "setting"}
            runs[f"{engine}/{seed}"] = {"engine": engine, "seed": seed, **record}
    import trl

    record = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": device_name("cpu"),
              "trl": trl.__version__, "command": " ".join(sys.argv), "setting": asdict(s),
              "option_map": [dict(zip(("option", "sdpo_fast", "trl"), row)) for row in OPTION_MAP],
              "runs": runs}
    write_json(args.out / "vs_trl.json", record)
    report(args.out / "vs_trl.json")


def report(path: Path) -> None:
    """(Re)compute the summary of a results file, rewrite it with its plot, print the tables."""
    from sdpo_fast.files import write_json

    record = json.loads(path.read_text())
    s = Setting(**record["setting"])
    record["summary"] = summarise(record["runs"], s)
    write_json(path, record)
    plot(record["runs"], record["summary"], path.with_suffix(".png"))
    print(markdown(record["runs"], record["summary"], s))


if __name__ == "__main__":
    main()
