"""One-command check of a CUDA machine: the fused op's correctness at LLM size, its benchmark, CUDA-graph
capture, the GPU tests and `sdpo-fast bench --only op scoring`, written to one JSON + one Markdown report.

    make gpu-check                    # python3 benchmarks/gpu_check.py --out benchmarks/results/gpu_check
    python benchmarks/gpu_check.py --out DIR --dry-run    # the same sections on CPU, tiny shapes (CI runs it)

Made for a machine with torch and triton preinstalled, no network and about ten minutes:
- nothing is installed or downloaded (the Hugging Face libraries and pip are put offline);
- the checkout is imported in place: a temporary tree of links lays `kernels/` out as `sdpo_fast.kernels`,
  as the installed package does, so no install is needed;
- every section runs in its own process under a time limit taken from one overall budget (--budget-s), so a
  crash or a hang costs that section only; the report is rewritten after each section.

Sections: environment (device, driver, versions); correctness (every `linear_distill` variant and
`linear_logprobs`, values and gradients, against the float64 specification `impl="naive"`); op_benchmark
(docs/kernels.md's benchmark: ms, TFLOP/s, % of a matmul of the same shape, peak memory); cuda_graph_triton and
cuda_graph_chunked (capture, replay on new inputs, compare with eager; host syncs of one eager step); bench
(`sdpo-fast bench --only op scoring` through the bench library); gpu_tests (pytest -m gpu, and the Triton
tests on the GPU); resources (the kernels' compile report, when the checkout has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from gpu_check_report import REPORT_NAME, write_report
from gpu_check_sections import DRY_PLAN, GPU_PLAN, SECTIONS, TAIL_CHARS, set_partial_file, run_logged, tail

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------ running sections
def source_tree(repo: Path, dest: Path) -> Path:
    """A folder that imports this checkout as the installed package would: links to every top-level entry of
    `repo`, except sdpo_fast/, which becomes a folder of links to its entries plus kernels/ as
    sdpo_fast/kernels (pyproject's package-dir). With it first on sys.path (and as the working directory),
    `import sdpo_fast.kernels` needs no install."""
    package = dest / "sdpo_fast"
    package.mkdir(parents=True)
    for entry in repo.iterdir():
        if entry.name != "sdpo_fast":
            (dest / entry.name).symlink_to(entry)
    for entry in (repo / "sdpo_fast").iterdir():
        (package / entry.name).symlink_to(entry)
    if not (package / "kernels").exists():
        (package / "kernels").symlink_to(repo / "kernels")
    return dest


def run_section(name: str, root: Path, work: Path, timeout: float, dry: bool) -> dict:
    """Run one section in a child process of `root` under `timeout` seconds; its result with status and time."""
    result_file, log = work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--child", name, "--result", str(result_file),
           "--deadline", str(time.time() + 0.85 * timeout), *(["--dry-run"] if dry else [])]
    start, cpu = time.time(), _children_cpu_s()
    rc = run_logged(cmd, log, timeout, cwd=root, env=child_env(root, dry))
    seconds, cpu_s = round(time.time() - start, 1), round(_children_cpu_s() - cpu, 1)
    if rc is None:
        result = {"status": "timeout", "reason": f"killed after {timeout:.0f} s"}
        partial = result_file.with_suffix(".partial")
        if partial.exists():
            result.update(json.loads(partial.read_text()), reason=f"killed after {timeout:.0f} s; figures so far kept")
    elif result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {"status": "error", "reason": f"the section's process exited with code {rc} and no result"}
    result.update(seconds=seconds, cpu_s=cpu_s, timeout_s=round(timeout), returncode=rc)
    if result["status"] not in ("ok", "skipped"):
        result["log_tail"] = tail(log, TAIL_CHARS)
    return result


def _children_cpu_s() -> float:
    """CPU seconds used so far by this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_env(root: Path, dry: bool) -> dict:
    """The sections' environment: offline, the checkout first on the path, the Triton interpreter only when dry."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_child(name: str, result_file: Path, deadline: float, dry: bool) -> None:
    """Child side: run one section and write its result (an exception becomes status "error")."""
    plan = DRY_PLAN if dry else GPU_PLAN
    set_partial_file(result_file.with_suffix(".partial"))
    try:
        if dry and importlib.util.find_spec("threadpoolctl"):  # numpy's BLAS pool fighting torch's threads
            from threadpoolctl import threadpool_limits  # makes the Triton interpreter several times slower

            threadpool_limits(limits=1, user_api="blas")
        result = SECTIONS[name][0](plan, deadline)
    except Exception as exc:  # noqa: BLE001 - any failure of a section is its result
        first_line = (str(exc).splitlines() or [""])[0][:300]
        result = {"status": "error", "reason": f"{type(exc).__name__}: {first_line}",
                  "traceback": traceback.format_exc()[-TAIL_CHARS:]}
    result_file.write_text(json.dumps(result, indent=1, default=str))


def source_digest(repo: Path) -> str:
    """sha256 of the Python sources that the check measures (identifies the code where git metadata is absent)."""
    digest = hashlib.sha256()
    for path in sorted([*repo.glob("sdpo_fast/**/*.py"), *repo.glob("kernels/**/*.py")]):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, the Triton interpreter: checks the script end to end")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--budget-s", type=float, help="seconds for all sections together (default 480; dry run 300)")
    parser.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and args.out is None:
        parser.error("--out DIR is required")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.result, args.deadline, args.dry_run)
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible; use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # runs the clean-up below
    budget = args.budget_s or plan.budget_s
    status = _git("status", "--porcelain", "--untracked-files=no")
    started = time.time()
    record = {"tool": "benchmarks/gpu_check.py", "dry_run": plan.dry,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
              "commit": _git("rev-parse", "HEAD") or "unknown (no git metadata)",
              "dirty": None if status is None else bool(status),
              "source_digest": source_digest(REPO), "host": platform.node(), "budget_s": budget,
              "plan": dataclasses.asdict(plan), "sections": {}}
    names = args.only or list(SECTIONS)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = source_tree(REPO, Path(tmp) / "src")
        for name in names:
            left = budget - (time.time() - started)
            box = SECTIONS[name][2 if plan.dry else 1]
            if left < 15:
                result = {"status": "skipped", "reason": f"time budget of {budget:.0f} s spent", "seconds": 0}
            else:
                try:
                    result = run_section(name, root, Path(tmp), min(box, left), plan.dry)
                except (KeyboardInterrupt, SystemExit):  # stopped from outside: say so in the report, then stop
                    record["sections"][name] = {"status": "interrupted", "reason": "the check was stopped"}
                    write_report(args.out, record)
                    raise
            record["sections"][name] = result
            record["wall_s"] = round(time.time() - started, 1)
            write_report(args.out, record)
            print(f"[{result['status']:>7}] {name:<20} {result['seconds']:7.1f} s  {result.get('reason', '')}",
                  flush=True)
    statuses = [s["status"] for s in record["sections"].values()]
    print(f"\n{REPORT_NAME}: {statuses.count('ok')} ok, {statuses.count('skipped')} skipped, "
          f"{len(statuses) - statuses.count('ok') - statuses.count('skipped')} not ok, {record['wall_s']} s; "
          f"report in {args.out / (REPORT_NAME + '.md')} and .json")
    return 0 if all(s in ("ok", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
