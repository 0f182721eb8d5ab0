"""CPU benchmark of shared-prefix scoring: tokens processed and median time, shared vs unshared.

G rollouts of one prompt. Student: hidden states with forward + backward on [prompt | y_i]. Teacher (no
grad): [prompt | demonstration | instruction | y_i], the teacher context shared by all G failed rollouts;
scored unshared, shared, and shared continuing from the prompt keys/values recorded in the student pass
(live teacher). Shared runs use each backend in --backends. Variants run interleaved in one process (warm-up,
then the median of the repeats), so the ratios are comparable on a noisy machine.

    python benchmarks/bench_scoring.py --threads 1         # prompt 512 / response 128 and 128 / 512
    python benchmarks/bench_scoring.py --shapes 256x64 --repeats 3   # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date
from pathlib import Path

import torch

from sdpo_fast.bench.common import git_commit
from sdpo_fast.bench.scoring import run_shape, scoring_model
from sdpo_fast.files import write_json
from sdpo_fast.scoring.api import DEFAULT_MAX_ROW_TOKENS

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512x128", "128x512"], help="PROMPTxRESPONSE tokens")
    parser.add_argument("--g", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--demo", type=int, default=128, help="demonstration tokens in the teacher context")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-row-tokens", type=int, default=DEFAULT_MAX_ROW_TOKENS)
    parser.add_argument("--backends", nargs="+", default=["dense", "segments"], help="shared-prefix backends")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scoring_cpu.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model = scoring_model(args.hidden, args.layers)
    rows = []
    for shape in args.shapes:
        prompt, response = (int(x) for x in shape.split("x"))
        rows += run_shape(model, prompt, response, g=args.g, demo=args.demo, backends=args.backends,
                          max_row_tokens=args.max_row_tokens, warmup=args.warmup, repeats=args.repeats)

    print(f"\nllama {args.layers} layers, hidden {args.hidden}, fp32, G={args.g}, demo {args.demo}, "
          f"max_row_tokens {args.max_row_tokens}; median of {args.repeats} after {args.warmup} warm-up runs, "
          f"{torch.get_num_threads()} threads")
    print(f"{'prompt':>6} {'resp':>5}  {'task':<16} {'variant':<22} {'tokens':>7} {'ms':>8} "
          f"{'tokens saved':>12} {'speed-up':>9}")
    for r in rows:
        print(f"{r['prompt']:>6} {r['response']:>5}  {r['task']:<16} {r['variant']:<22} {r['tokens']:>7} "
              f"{r['ms']:>8.1f} {r['token_ratio']:>11.2f}x {r['speedup']:>8.2f}x")
    record = {"date": date.today().isoformat(), "commit": git_commit(), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "layers": args.layers,
              "hidden": args.hidden, "g": args.g, "demo": args.demo, "max_row_tokens": args.max_row_tokens,
              "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
