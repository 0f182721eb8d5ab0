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
import json
import multiprocessing as mp
import platform
import resource
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _child(impl: str, n: int, hidden: int, vocab: int, alpha: float, repeats: int, mem_limit: int,
           chunk_elems: int | None, queue) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    try:
        import torch

        import sdpo_fast.distill.chunked as chunked
        from sdpo_fast import linear_distill

        if chunk_elems:
            chunked.DEFAULT_CHUNK_ELEMS = chunk_elems

        torch.manual_seed(0)
        hs = torch.randn(n, hidden) / hidden**0.25
        ht = torch.randn(n, hidden) / hidden**0.25
        w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(True)
        wt = torch.randn(vocab, hidden) / hidden**0.5
        y = torch.randint(0, vocab, (n,))
        g_div, g_logp = torch.rand(n), torch.randn(n)
        _touch_libraries(linear_distill, impl, hidden)  # BLAS/thread-pool start-up is not the op's memory
        base_rss = _rss_bytes()
        times = []
        for _ in range(repeats + 1):  # the first run is warm-up
            h = hs.clone().requires_grad_(True)
            w.grad = None
            start = time.perf_counter()
            out = linear_distill(h, ht, w, y, teacher_weight=wt, alpha=alpha, impl=impl)
            ((out.divergence * g_div).sum() + (out.student_logp * g_logp).sum()).backward()
            times.append(time.perf_counter() - start)
            del out, h
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put({"ms": 1e3 * statistics.median(times[1:]), "extra_mb": (peak - base_rss) / 2**20})
    except (MemoryError, RuntimeError) as exc:
        queue.put({"error": "out of memory" if "alloc" in str(exc).lower() or isinstance(exc, MemoryError)
                   else str(exc)[:200]})


def _touch_libraries(linear_distill, impl: str, hidden: int) -> None:
    import torch

    h = torch.randn(8, hidden, requires_grad=True)
    w = torch.randn(64, hidden, requires_grad=True)
    out = linear_distill(h, h.detach(), w, torch.zeros(8, dtype=torch.long), impl=impl)
    (out.divergence.sum() + out.student_logp.sum()).backward()


def measure(impl: str, n: int, args) -> dict:
    """Run one configuration in a fresh process and return its figures (or its error)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(impl, n, args.hidden, args.vocab, args.alpha, args.repeats,
                                            int(args.mem_limit_gb * 2**30), args.chunk_elems, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
        rows.append({"impl": impl, "n": n, **measure(impl, n, args)})

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

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": date.today().isoformat(), "commit": _commit(), "machine": platform.processor() or
              platform.machine(), "cpus": mp.cpu_count(), "hidden": args.hidden, "vocab": args.vocab,
              "alpha": args.alpha, "repeats": args.repeats, "chunk_elems": args.chunk_elems, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
