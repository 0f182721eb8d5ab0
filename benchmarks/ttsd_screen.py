"""Per-problem sampled success rate of a model on a task: which problems it "rarely solves" (for the
test-time search experiment, docs/ttsd.md).

Samples `--samples` attempts (temperature 1, as the search does) for each of the first `--candidates`
problems of the task's held-out split, evaluates them, prints the successes per problem, and writes JSON.

    nice -n 10 .venv/bin/python benchmarks/ttsd_screen.py --task arithmetic --task-options digits=2 ops=+ \\
        --candidates 24 --samples 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdpo_fast.envs import BatchEvaluator
from sdpo_fast.files import write_atomically
from sdpo_fast.models import load_model, load_tokenizer
from sdpo_fast.rollout import SamplingConfig, generate
from sdpo_fast.train.evaluate import eos_ids, prompt_ids
from sdpo_fast.ttsd import task_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--task-options", nargs="*", default=[], help="KEY=VALUE knobs of a built-in task")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (not one the experiment uses)")
    parser.add_argument("--out", default="benchmarks/results/ttsd_screen.json")
    args = parser.parse_args()
    options = dict(kv.split("=", 1) for kv in args.task_options)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    problems, env = task_problems(args.task, "heldout", args.candidates, options)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in problems]
    out = generate(model, prompts, args.samples, SamplingConfig(args.max_new_tokens, 1.0),
                   eos_token_ids=eos_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, batch_size=args.batch)
    texts = tokenizer.batch_decode(out.responses, skip_special_tokens=True)
    with BatchEvaluator(env) as evaluator:
        evals = evaluator.evaluate([p for p in problems for _ in range(args.samples)], texts)
    rows = []
    for i, problem in enumerate(problems):
        rewards = [e.reward for e in evals[i * args.samples:(i + 1) * args.samples]]
        rows.append({"index": i, "prompt": problem["prompt"], "successes": sum(r >= 1.0 for r in rewards)})
        print(f"{i:3d}  {rows[-1]['successes']:2d}/{args.samples}  {problem['prompt']}", flush=True)
    total = sum(r["successes"] for r in rows)
    print(f"mean success per attempt {total / (len(rows) * args.samples):.3f}; "
          f"{time.perf_counter() - start:.0f} s")
    record = {"model": args.model, "task": args.task, "task_options": options, "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "problems": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(args.out), json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
