"""pytest-benchmark: one training step, SDPO vs GRPO, on the tiny random model (the step case of
`sdpo-fast bench`; the SDPO paper reports +5.8% / +17.1% step time over GRPO), timed, with what the step
time is made of: its phases account for it, and only SDPO has the teacher score tokens."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.bench.step import PHASES, step_config, step_functions


@pytest.mark.parametrize("algorithm", ["sdpo", "grpo"])
def test_training_step(benchmark, tmp_path, algorithm):
    benchmark.group = "training step, tiny-random, 2 prompts x 4 rollouts, 16 new tokens"
    cfg = step_config(algorithm, model="tiny-random", task="arithmetic", prompts=2, rollouts=4, max_new_tokens=16,
                      micro_batch_size=8, device="auto", rollout="hf", output_dir=tmp_path)
    records = []
    with step_functions({algorithm: cfg}) as functions:
        def run() -> None:
            records.append(functions[algorithm]())
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        benchmark.pedantic(run, warmup_rounds=1, rounds=3)

    for metrics in records:
        phases = sum(metrics.get(key, 0.0) for key in PHASES if key != "time/step_s")
        assert 0.9 * metrics["time/step_s"] <= phases <= metrics["time/step_s"] * 1.001
        teacher_tokens = metrics.get("reprompt/teacher_tokens", 0.0)
        assert teacher_tokens > 0 if algorithm == "sdpo" else teacher_tokens == 0
