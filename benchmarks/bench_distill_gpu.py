"""GPU benchmark of linear_distill: forward + backward time, TFLOP/s and peak memory per implementation.

For every (implementation, N, alpha): warm-up runs, then the median of timed runs (CUDA events) of one
forward + backward with random upstream gradients on divergence and student_logp, and the peak memory
allocated beyond the inputs and d(weight). TFLOP/s counts 12 N H V per step (forward logits of both
streams 4NHV, their recompute in backward 4NHV, the two gradient GEMMs 4NHV); "% mm" divides it by the
rate of a bf16 torch.mm measured in the same run. Liger-Kernel's LigerFusedLinearJSD (jsd_beta = alpha)
is timed when installed. Results go to a table on stdout and to JSON.

    python benchmarks/bench_distill_gpu.py                        # the issue's grid on a CUDA device
    python benchmarks/bench_distill_gpu.py --device cpu --small   # smoke test of this script on CPU
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from sdpo_fast.bench.common import git_commit
from sdpo_fast.bench.op import OpRow, matmul_tflops, measure
from sdpo_fast.files import write_json

RESULTS = Path(__file__).parent / "results"


def print_table(rows: list[OpRow], args, mm_rate: float) -> None:
    print(f"\nH={args.hidden} V={args.vocab} {str(args.dtype).removeprefix('torch.')} on {args.device_name}; "
          f"median of {args.repeats} after {args.warmup} warm-up; {args.dtype_name} mm {mm_rate:.3g} TFLOP/s")
    print(f"{'N':>6} {'alpha':>5} {'impl':>8} {'ms':>9} {'TFLOP/s':>8} {'% mm':>6} {'extra MB':>9}  note")
    for r in rows:
        if r.error:
            print(f"{r.n:>6} {r.alpha:>5} {r.impl:>8} {'-':>9} {'-':>8} {'-':>6} {'-':>9}  {r.error}")
            continue
        mem = f"{r.extra_mb:9.0f}" if r.extra_mb is not None else f"{'n/a':>9}"
        print(f"{r.n:>6} {r.alpha:>5} {r.impl:>8} {r.ms:9.2f} {r.tflops:8.3g} {r.pct_matmul:6.1f} {mem}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (H=64, V=1003, N in {64, 256}), fp32, naive and chunked: checks the script")
    parser.add_argument("--n", type=int, nargs="+", help="token counts (default 2048 8192 16384)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--impls", nargs="+", choices=["triton", "chunked", "naive", "liger"])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the reference square mm")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/distill_gpu[_small].json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --small to check the script")
    if args.small:
        args.hidden, args.vocab, args.dtype, args.matmul_size = 64, 1003, "fp32", 256
        args.n = args.n or [64, 256]
        args.impls = args.impls or ["chunked", "naive"]
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    args.n = args.n or [2048, 8192, 16384]
    args.impls = args.impls or ["triton", "chunked", "naive", "liger"]
    args.dtype_name = args.dtype
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    args.out = args.out or RESULTS / f"distill_gpu{'_small' if args.small else ''}.json"
    return args


def main() -> None:
    args = parse_args()
    mm_rate = matmul_tflops(args.device, args.dtype, args.matmul_size, args.warmup, args.repeats)
    cases = [(n, alpha, impl) for n in args.n for alpha in args.alpha for impl in args.impls]
    rows = [measure(impl, n, alpha, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype, device=args.device,
                    warmup=args.warmup, repeats=args.repeats, mm_rate=mm_rate)
            for n, alpha, impl in tqdm(cases, desc="linear_distill fwd+bwd", unit="case")]
    print_table(rows, args, mm_rate)
    record = {
        "date": date.today().isoformat(), "commit": git_commit(), "device": args.device_name,
        "torch": torch.__version__, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype_name,
        "warmup": args.warmup, "repeats": args.repeats, "matmul_tflops": mm_rate,
        "flops_per_step": "12*N*H*V", "rows": [asdict(r) for r in rows],
    }
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
