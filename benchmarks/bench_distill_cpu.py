"""CPU benchmark of linear_distill: forward + backward time and peak memory, chunked vs naive.

Each (impl, N) runs in its own child process so that its peak RSS can be measured: memory "beyond the
inputs" is the child's peak RSS minus its RSS once the inputs exist (it includes d(weight), which every
implementation must produce). The child runs under an address-space limit, so an implementation that
does not fit reports "out of memory" instead of waking the kernel's OOM killer.

    python benchmarks/bench_distill_cpu.py                      # the issue's setting (slow: minutes)
    python benchmarks/bench_distill_cpu.py --n 256 --vocab 8191 --hidden 256 --repeats 2   # quick look
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
from datetime import date
from pathlib import Path

from tqdm import tqdm

from sdpo_fast.bench.common import git_commit
from sdpo_fast.bench.op import measure_isolated
from sdpo_fast.files import write_json

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096], help="token counts")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--impls", nargs="+", default=["naive", "chunked"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    parser.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space limit of each child")
    parser.add_argument("--chunk-elems", type=int, default=None, help="chunked: elements of one [C, V] block")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_cpu.json")
    args = parser.parse_args()

    rows = []
    configs = [(n, impl) for n in args.n for impl in args.impls]
    for n, impl in tqdm(configs, desc="linear_distill fwd+bwd", unit="run"):
        rows.append({"impl": impl, "n": n, **measure_isolated(
            impl, n, hidden=args.hidden, vocab=args.vocab, alpha=args.alpha, repeats=args.repeats,
            mem_limit_gb=args.mem_limit_gb, chunk_elems=args.chunk_elems)})

    import sdpo_fast.distill.chunked as chunked

    print(f"\nH={args.hidden} V={args.vocab} alpha={args.alpha} fp32, median of {args.repeats} after warm-up, "
          f"chunk of {args.chunk_elems or chunked.DEFAULT_CHUNK_ELEMS} elements")
    print(f"{'N':>6} {'impl':>8} {'ms':>10} {'extra MB':>10} {'time/naive':>11} {'mem/naive':>10}")
    for row in rows:
        naive = next((r for r in rows if r["n"] == row["n"] and r["impl"] == "naive" and "ms" in r), None)
        if "error" in row:
            print(f"{row['n']:>6} {row['impl']:>8} {row['error']:>10}")
            continue
        ratio_t = f"{row['ms'] / naive['ms']:.2f}x" if naive else "-"
        ratio_m = f"{100 * row['extra_mb'] / naive['extra_mb']:.1f}%" if naive else "-"
        print(f"{row['n']:>6} {row['impl']:>8} {row['ms']:>10.0f} {row['extra_mb']:>10.0f} {ratio_t:>11} {ratio_m:>10}")

    record = {"date": date.today().isoformat(), "commit": git_commit(), "machine": platform.processor() or
              platform.machine(), "cpus": mp.cpu_count(), "hidden": args.hidden, "vocab": args.vocab,
              "alpha": args.alpha, "repeats": args.repeats, "chunk_elems": args.chunk_elems, "rows": rows}
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
