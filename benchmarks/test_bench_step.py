"""pytest-benchmark: one training step, SDPO vs GRPO, on the tiny random model (the step section of
`sdpo-fast bench`; the SDPO paper reports +5.8% / +17.1% step time over GRPO)."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.bench.step import step_config


@pytest.mark.parametrize("algorithm", ["sdpo", "grpo"])
def test_training_step(benchmark, tmp_path, algorithm):
    from sdpo_fast.train.trainer import Trainer

    benchmark.group = "training step, tiny-random, 2 prompts x 4 rollouts, 16 new tokens"
    cfg = step_config(algorithm, model="tiny-random", task="arithmetic", prompts=2, rollouts=4, max_new_tokens=16,
                      micro_batch_size=8, device="auto", rollout="hf", output_dir=tmp_path)
    trainer = Trainer(cfg)

    def step() -> None:
        trainer.step += 1
        trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    try:
        benchmark.pedantic(step, warmup_rounds=1, rounds=3)
    finally:
        trainer.evaluator.close()
