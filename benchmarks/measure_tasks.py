"""Base accuracy of SmolLM2-135M-Instruct on the built-in tasks (which difficulty suits the CPU demo).

For each task configuration: `--n` held-out problems, greedy decoding and `--samples` samples per
problem at temperature 1, responses of at most `--max-new-tokens` tokens, chat template. Prints a table
and writes JSON (with one example feedback per configuration) to `--out`.

    .venv/bin/python benchmarks/measure_tasks.py --n 64 --samples 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdpo_fast.envs import BatchEvaluator, make_problems, task_env
from sdpo_fast.models import load_model, load_tokenizer

CONFIGS = [
    ("arithmetic", {"digits": 2, "digits_b": 1, "ops": "+"}),
    ("arithmetic", {"digits": 2, "ops": "+"}),
    ("arithmetic", {"digits": 2, "ops": "+-"}),
    ("string", {}),
    ("string", {"ops": "length,upper,first_last,double"}),
    ("code", {}),
    ("code", {"ops": "reverse,count_vowels,sort,drop_vowels,double"}),
]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, sample: bool, batch: int) -> list[str]:
    """Responses to `prompts` (chat template, left padding), greedy or sampled at temperature 1."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[i:i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **kwargs)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="response length cap (default: 48 for direct answers, 80 for code)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", default="", help="tasks to measure, separated by ';'")
    parser.add_argument("--out", default="benchmarks/results/tasks_smollm2.json",
                        help="JSON file; rows of configurations measured again replace the old ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m").eval()
    rows = []
    for task, knobs in CONFIGS:
        if args.only and f"{task}{json.dumps(knobs)}" not in args.only.split(";") and task not in args.only.split(";"):
            continue
        start = time.perf_counter()
        problems = make_problems(task, "heldout", args.n, seed=0, **knobs)
        prompts = [p["prompt"] for p in problems]
        max_new = args.max_new_tokens or (80 if task == "code" else 48)
        greedy = generate(model, tokenizer, prompts, max_new, False, args.batch)
        sampled = generate(model, tokenizer, prompts * args.samples, max_new, True, args.batch)
        with BatchEvaluator(task_env(task), workers=2) as evaluator:
            g_eval = evaluator.evaluate(problems, greedy)
            s_eval = evaluator.evaluate(problems * args.samples, sampled)
        failed = next((e for e in g_eval if e.reward < 1), None)
        row = {
            "task": task, "knobs": knobs, "n": args.n, "samples": args.samples, "max_new_tokens": max_new,
            "greedy_acc": sum(e.reward == 1 for e in g_eval) / len(g_eval),
            "sampled_acc": sum(e.reward == 1 for e in s_eval) / len(s_eval),
            "sampled_mean_reward": sum(e.reward for e in s_eval) / len(s_eval),
            "greedy_format_errors": sum(bool(e.details.get("format_error")) for e in g_eval) / len(g_eval),
            "sampled_format_errors": sum(bool(e.details.get("format_error")) for e in s_eval) / len(s_eval),
            "example_prompt": prompts[g_eval.index(failed)] if failed else "",
            "example_response": greedy[g_eval.index(failed)] if failed else "",
            "example_feedback": failed.feedback if failed else "",
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(f"{task:10s} {json.dumps(knobs):45s} greedy {row['greedy_acc']:.3f}  sampled {row['sampled_acc']:.3f}"
              f"  (mean reward {row['sampled_mean_reward']:.3f}, format errors greedy "
              f"{row['greedy_format_errors']:.2f} / sampled {row['sampled_format_errors']:.2f}) "
              f"{row['seconds']} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    measured = {(r["task"], json.dumps(r["knobs"])) for r in rows}
    rows = [r for r in old if (r["task"], json.dumps(r["knobs"])) not in measured] + rows
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
