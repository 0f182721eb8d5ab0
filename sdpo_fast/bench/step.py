"""Measurements of whole training steps: SDPO against GRPO (the paper reports +5.8% / +17.1% step time).

One `Trainer` per algorithm on the same model, task and batch; their steps run interleaved (warm-up steps
first), and each phase's median over the timed steps is reported (generate / evaluate / score / update,
plus weight sync with vLLM), with throughput and, on NVIDIA GPUs, the telemetry of the last step.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sdpo_fast.algorithm.config import LossConfig
from sdpo_fast.rollout.sampling import SamplingConfig
from sdpo_fast.train.config import EvalOptions, TrainConfig

PHASES = ("time/generate_s", "time/evaluate_s", "time/score_s", "time/update_s", "time/weight_sync_s",
          "time/step_s")


def step_config(algorithm: str, *, model: str, task: str, prompts: int, rollouts: int, max_new_tokens: int,
                micro_batch_size: int, device: str, rollout: str, output_dir: Path,
                task_options: dict[str, str] | None = None) -> TrainConfig:
    """A training config for benchmarking `algorithm` (no warm-up of the learning rate, no evaluation)."""
    return TrainConfig(model=model, task=task, task_options=dict(task_options or {}), loss=LossConfig(mode=algorithm),
                       device=device, rollout=rollout, prompts_per_step=prompts, rollouts_per_prompt=rollouts,
                       micro_batch_size=micro_batch_size, env_workers=1, output_dir=Path(output_dir),
                       sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                       eval=EvalOptions(problems=0))


@contextmanager
def step_functions(configs: dict[str, TrainConfig]) -> Iterator[dict[str, Callable[[], dict]]]:
    """{name: function running that config's trainer one step and returning the step's metrics}; the
    trainers are closed on exit."""
    from sdpo_fast.train.trainer import Trainer

    trainers = {name: Trainer(cfg) for name, cfg in configs.items()}

    def stepper(trainer: Trainer) -> Callable[[], dict]:
        def step() -> dict:
            trainer.step += 1
            return trainer.train_step()
        return step

    try:
        yield {name: stepper(trainer) for name, trainer in trainers.items()}
    finally:
        for trainer in trainers.values():
            trainer.close()


def run_steps(configs: dict[str, TrainConfig], *, warmup: int = 1, steps: int = 3,
              tick: Callable[[], None] | None = None) -> list[dict]:
    """Rows {algorithm, <phase medians>, tokens_per_s, steps, gpu telemetry} for each named config.

    tick: called after every step (a progress bar's update).
    """
    records: dict[str, list[dict]] = {name: [] for name in configs}
    with step_functions(configs) as functions:
        for k in range(warmup + steps):
            for name, step in functions.items():
                metrics = step()
                if k >= warmup:
                    records[name].append(metrics)
                if tick is not None:
                    tick()
    rows = []
    for name, recs in records.items():
        row = {"algorithm": name, "steps": len(recs)}
        for key in PHASES:
            if all(key in r for r in recs):
                row[key.removeprefix("time/")] = statistics.median(r[key] for r in recs)
        row["tokens_per_s"] = statistics.median(r["throughput/tokens_per_s"] for r in recs)
        row["reward"] = statistics.mean(r["reward/mean"] for r in recs)
        # Tokens the teacher scores per step (0 for GRPO): what SDPO's extra cost grows with.
        row["teacher_tokens"] = statistics.median(r.get("reprompt/teacher_tokens", 0.0) for r in recs)
        row.update({k: v for k, v in recs[-1].items() if k.startswith("gpu")})
        rows.append(row)
    return rows
