"""The sections of benchmarks/gpu_check.py: each takes the run's plan and a deadline and returns
{"status": "ok" | "failed" | "skipped", "reason"?, "figures": {...}}. Each runs in a process of its own."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TAIL_CHARS = 4000


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Shapes, repeats and time limits of one run: LLM-sized on a GPU, tiny on CPU (--dry-run)."""

    dry: bool
    device: str
    dtype: str
    hidden: int
    vocab: int
    n: tuple[int, ...]  # token counts of the correctness check and the op benchmark
    ref_rows: int  # rows per float64 reference pass (bounds its memory; the op is row-separable)
    bench_alphas: tuple[float, ...]
    warmup: int
    repeats: int
    mm_size: int  # side of the square matmul that `sdpo-fast bench` divides by
    graph_n: int
    budget_s: float


GPU_PLAN = Plan(dry=False, device="cuda", dtype="bf16", hidden=4096, vocab=151936, n=(2048, 8192), ref_rows=2048,
                bench_alphas=(0.0, 0.5, 1.0), warmup=3, repeats=10, mm_size=8192, graph_n=2048, budget_s=480)
DRY_PLAN = Plan(dry=True, device="cpu", dtype="fp32", hidden=64, vocab=300, n=(40,), ref_rows=16,
                bench_alphas=(0.5,), warmup=0, repeats=1, mm_size=256, graph_n=48, budget_s=300)

# Bound on max |got - ref| per output: the plain-torch error in the same dtype (impl="naive" in that dtype) plus
# REL x max |ref| + ABS. The bf16/fp16 pair is the interpreter tests' (test_half_precision_no_worse_than_torch).
TOLERANCE = {"bf16": (2e-2, 1e-3), "fp16": (2e-2, 1e-3), "fp32": (1e-4, 1e-4)}
GRAPH_TOLERANCE = 1e-5  # replay vs eager on the same inputs: max |diff| <= this x max |eager| per output


@dataclass(frozen=True)
class Case:
    """One variant of the op checked against the float64 specification."""

    name: str
    alpha: float = 0.5
    topk: int | None = None
    add_tail: bool = True
    adv_clip: float | None = None
    logprobs: bool = False  # linear_logprobs instead of linear_distill


CASES = (
    Case("alpha=0", 0.0), Case("alpha=0.5", 0.5), Case("alpha=1", 1.0),
    Case("top-20 alpha=1", 1.0, topk=20), Case("top-20 alpha=1 adv_clip=2", 1.0, topk=20, adv_clip=2.0),
    Case("top-20 alpha=0.5 no tail", 0.5, topk=20, add_tail=False),
    Case("linear_logprobs", logprobs=True),
)


_PARTIAL: list[Path] = []  # in a section's process: the file that keeps its figures so far


def set_partial_file(path: Path) -> None:
    """Where `save_partial` writes, in this section's process."""
    _PARTIAL[:] = [path]


def save_partial(figures: dict) -> None:
    """Keep the figures measured so far: a section killed at its time limit still reports them."""
    for path in _PARTIAL:
        path.write_text(json.dumps({"figures": figures}, default=str))


def ok(**figures) -> dict:
    return {"status": "ok", "figures": figures}


def skipped(reason: str, **figures) -> dict:
    return {"status": "skipped", "reason": reason, "figures": figures}


def _dtype(plan: Plan):
    from sdpo_fast.bench.run import DTYPES

    return DTYPES[plan.dtype]


# ------------------------------------------------------------------------------------------ environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _kernels_from() -> str | None:
    """The folder `sdpo_fast.kernels` was imported from (None when it cannot be, e.g. without triton)."""
    try:
        import sdpo_fast.kernels
    except ImportError:
        return None
    return str(Path(sdpo_fast.kernels.__file__).parent)


def section_environment(plan: Plan, deadline: float) -> dict:
    """Device, driver, CUDA and library versions, and where sdpo_fast was imported from."""
    import torch

    import sdpo_fast
    from sdpo_fast.bench.common import device_name

    figures = {"device": device_name(plan.device), "python": platform.python_version(), "torch": torch.__version__,
               "cuda_runtime": torch.version.cuda, "triton": _version("triton"),
               "transformers": _version("transformers"), "pytest": _version("pytest"),
               "liger_kernel": _version("liger-kernel"), "flash_attn": _version("flash-attn"),
               "cpus": os.cpu_count(), "sdpo_fast_from": str(Path(sdpo_fast.__file__).parent),
               "kernels_from": _kernels_from(),
               "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        figures.update(driver=_driver_version(), capability=f"{props.major}.{props.minor}",
                       multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                       l2_cache_mib=getattr(props, "L2_cache_size", 0) / 2**20 or None)
    else:
        figures["driver"] = None
    return ok(**figures)


# ------------------------------------------------------------------------------------------ correctness
def _run_op(case: Case, impl: str, hs, ht, w, wt, targets, g_div, g_logp) -> dict:
    """Outputs of one forward + backward (upstream gradients g_div on the divergence, g_logp on the log-probs);
    hs and w are leaves whose .grad this fills (w's accumulates across calls)."""
    from sdpo_fast import linear_distill, linear_logprobs

    if case.logprobs:
        out = linear_logprobs(hs, w, targets, impl=impl)
        fields = {"logp": out.logp, "entropy": out.entropy}
        loss = (out.logp * g_logp).sum()
    else:
        out = linear_distill(hs, ht, w, targets, teacher_weight=wt, alpha=case.alpha, topk=case.topk,
                             add_tail=case.add_tail, adv_clip=case.adv_clip, impl=impl)
        fields = {f: getattr(out, f) for f in ("divergence", "student_logp", "teacher_logp", "advantage", "entropy")}
        loss = (out.divergence * g_div).sum() + (out.student_logp * g_logp).sum()
    loss.backward()
    return {k: v.detach() for k, v in fields.items()}


def _outputs(case: Case, impl: str, x: dict, dtype=None, ref_rows: int | None = None) -> dict:
    """Per-token outputs and both gradients of `impl` on the inputs `x` (cast to `dtype` if given); with
    `ref_rows`, the rows go through in slices of that many (the outputs are per row and d(weight) sums)."""
    import torch

    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    w = cast(x["w"]).requires_grad_(True)
    hs_all, ht, wt = cast(x["hs"]), cast(x["ht"]), cast(x["wt"])
    n = hs_all.shape[0]
    step = ref_rows or n
    parts, grads_h = [], []
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        hs = hs_all[rows].clone().requires_grad_(True)
        parts.append(_run_op(case, impl, hs, ht[rows], w, wt, x["targets"][rows], x["g_div"][rows],
                             x["g_logp"][rows]))
        grads_h.append(hs.grad)
    result = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    result["d_student_hidden"] = torch.cat(grads_h)
    result["d_weight"] = w.grad
    return result


def _compare(got: dict, ref: dict, base: dict, valid, rule: tuple[float, float]) -> list[dict]:
    """Per output: max |err|, relative L2 error, the plain-torch baseline's, the bound, ignored rows zero."""
    import torch

    rel_tol, abs_tol = rule
    rows = []
    for field, want in ref.items():
        g, b = got[field].double(), base[field].double()
        err = (g - want).abs().max().item()
        base_err = (b - want).abs().max().item()
        scale = want.abs().max().item()
        norm = want.norm().item()
        finite = bool(torch.isfinite(g).all())
        ignored_zero = True
        if field != "d_weight" and not bool(valid.all()):
            ignored_zero = bool((g[~valid] == 0).all())
        bound = base_err + rel_tol * scale + abs_tol
        rows.append({"field": field, "max_abs_err": err, "rel_l2_err": (g - want).norm().item() / norm if norm else err,
                     "baseline_max_abs_err": base_err,
                     "baseline_rel_l2_err": (b - want).norm().item() / norm if norm else base_err,
                     "ref_max_abs": scale, "bound": bound, "finite": finite, "ignored_rows_zero": ignored_zero,
                     "ok": finite and ignored_zero and err <= bound})
    return rows


def section_correctness(plan: Plan, deadline: float) -> dict:
    """Every case at every N: triton (full vocabulary only: it rejects topk) and chunked in the plan's dtype,
    against impl="naive" in float64 on the same (rounded) inputs; naive in the plan's dtype is the baseline."""
    import torch

    from sdpo_fast.bench.op import make_inputs

    dtype = _dtype(plan)
    rows, missing = [], []
    figures = {"dtype": plan.dtype, "hidden": plan.hidden, "vocab": plan.vocab, "n": list(plan.n),
               "reference": f"impl='naive' in float64 on the {plan.dtype} inputs, {plan.ref_rows} rows per pass",
               "outputs": "every output of the op (student_logp and advantage are the sampled-token objective's) "
                          "and d(student_hidden), d(weight) for upstream gradients on divergence and student_logp",
               "tolerance": {"rel": TOLERANCE[plan.dtype][0], "abs": TOLERANCE[plan.dtype][1]},
               "rows": rows, "not_run": missing}
    for n in plan.n:
        x = make_inputs(n, plan.hidden, plan.vocab, dtype, plan.device, seed=n)
        valid = x["targets"] != -100
        for case in CASES:
            if time.time() > deadline:
                missing.append(f"N={n} {case.name}")
                continue
            ref = _outputs(case, "naive", x, dtype=torch.float64, ref_rows=plan.ref_rows)
            base = _outputs(case, "naive", x)
            for impl in ("triton", "chunked") if case.topk is None else ("chunked",):
                head = {"n": n, "case": case.name, "impl": impl}
                try:
                    got = _outputs(case, impl, x)
                except (ValueError, RuntimeError) as exc:
                    rows.append({**head, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                 "ok": False})
                    continue
                rows += [{**head, **r} for r in _compare(got, ref, base, valid, TOLERANCE[plan.dtype])]
                del got
            rows += [{"n": n, "case": case.name, "impl": "naive (baseline)", **r}
                     for r in _compare(base, ref, base, valid, TOLERANCE[plan.dtype])]
            del ref, base
            if plan.device == "cuda":
                torch.cuda.empty_cache()
            save_partial(figures)
        del x
    failed = [r for r in rows if not r["ok"]]
    result = {"status": "failed" if failed or missing else "ok", "figures": figures}
    reasons = [*([f"{len(failed)} of {len(rows)} outputs outside the bound or not run"] if failed else []),
               *([f"time limit: {len(missing)} cases not run"] if missing else [])]
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


# ----------------------------------------------------------------------------------------- op benchmark
def section_op_benchmark(plan: Plan, deadline: float) -> dict:
    """docs/kernels.md's benchmark: forward + backward per impl, N and alpha (sdpo_fast.bench.op.measure)."""
    import torch

    from sdpo_fast.bench.op import matmul_tflops, measure
    from sdpo_fast.bench.report import add_op_ratios

    liger = importlib.util.find_spec("liger_kernel") is not None
    impls = ["triton", "chunked", "naive", *(["liger"] if liger else [])]
    dtype = _dtype(plan)
    square = matmul_tflops(plan.device, dtype, plan.mm_size, plan.warmup, plan.repeats)
    rows, missing = [], []
    figures = {"dtype": plan.dtype, "hidden": plan.hidden, "vocab": plan.vocab, "warmup": plan.warmup,
               "repeats": plan.repeats, "flops_per_step": "12*N*H*V (the JSD's second forward pass not counted)",
               "pct_matmul": "of torch.mm [N,H]x[H,V] in the same dtype, same run",
               "matmul_tflops_square": square, "square_size": plan.mm_size,
               "memory": "peak CUDA memory beyond the inputs and d(weight)" if plan.device == "cuda"
               else "not measured on CPU", "liger": "timed" if liger else "liger_kernel not installed",
               "rows": rows, "not_run": missing}
    for n in plan.n:
        same_shape = matmul_tflops(plan.device, dtype, plan.mm_size, plan.warmup, plan.repeats,
                                   shape=(n, plan.hidden, plan.vocab))  # the op's GEMM: N x H times H x V
        for alpha in plan.bench_alphas:
            for impl in impls:
                if time.time() > deadline:
                    missing.append(f"N={n} alpha={alpha} {impl}")
                    continue
                row = measure(impl, n, alpha, hidden=plan.hidden, vocab=plan.vocab, dtype=dtype, device=plan.device,
                              warmup=plan.warmup, repeats=plan.repeats, mm_rate=same_shape)
                rows.append({**dataclasses.asdict(row), "matmul_tflops_same_shape": same_shape})
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
                save_partial(figures)
    add_op_ratios(rows)
    failed = [r for r in rows if r["error"] and r["impl"] != "liger"]
    result = {"status": "failed" if failed or missing else "ok", "figures": figures}
    if failed or missing:
        result["reason"] = "; ".join([*(f"{r['impl']} N={r['n']}: {r['error']}" for r in failed[:3]),
                                      *([f"time limit: {len(missing)} cases not run"] if missing else [])])
    return result


# ------------------------------------------------------------------------------------------- CUDA graphs
def _sync_warnings(step: Callable[[], list]) -> list[str]:
    """Messages of the host synchronisations one call of `step` makes (torch's sync debug mode)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]


def section_cuda_graph(plan: Plan, deadline: float, impl: str) -> dict:
    """Capture one forward + backward of `impl` in a CUDA graph, replay it on new inputs, compare with eager."""
    if plan.device != "cuda":
        return skipped("CUDA graphs need a CUDA device")
    import torch

    from sdpo_fast.bench.op import make_inputs, make_step

    dtype = _dtype(plan)
    static = make_inputs(plan.graph_n, plan.hidden, plan.vocab, dtype, "cuda", seed=1)
    fresh = make_inputs(plan.graph_n, plan.hidden, plan.vocab, dtype, "cuda", seed=2)
    step = make_step(impl, static, 0.5)
    step()  # compilation and autotuning (which synchronise) stay out of the count
    syncs = _sync_warnings(step)
    figures = {"impl": impl, "n": plan.graph_n, "hidden": plan.hidden, "vocab": plan.vocab, "dtype": plan.dtype,
               "host_syncs_in_eager_step": len(syncs), "sync_messages": sorted(set(syncs))}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static["hs"].grad = static["w"].grad = None
    try:
        with torch.cuda.graph(graph):
            captured = step()
    except (RuntimeError, ValueError) as exc:
        figures["captured"] = False
        return {"status": "failed", "reason": f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "figures": figures}
    with torch.no_grad():
        for key in ("hs", "ht", "w", "wt", "targets", "g_div", "g_logp"):
            static[key].copy_(fresh[key])
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in captured]
    eager = make_step(impl, fresh, 0.5)()
    names = ("divergence", "student_logp", "d_student_hidden", "d_weight")
    diffs = {name: (a.double() - b.double()).abs().max().item() for name, a, b in zip(names, replayed, eager)}
    scales = {name: b.abs().max().item() for name, b in zip(names, eager)}
    match = all(diffs[k] <= GRAPH_TOLERANCE * scales[k] for k in names)
    figures.update(captured=True, replay_max_abs_diff=diffs, eager_max_abs=scales, tolerance=GRAPH_TOLERANCE,
                   bitwise_equal=all(torch.equal(a, b) for a, b in zip(replayed, eager)), replay_matches_eager=match)
    return {"status": "ok" if match else "failed", "figures": figures,
            **({} if match else {"reason": "the replay differs from eager on the same inputs"})}


# ------------------------------------------------------------------------------------------------ bench
def section_bench(plan: Plan, deadline: float) -> dict:
    """`sdpo-fast bench --only op scoring` through the bench library: scoring at its GPU defaults, the op at one
    Triton case (op_benchmark has already timed the op's full table); tiny on a dry run."""
    from sdpo_fast.bench import report
    from sdpo_fast.bench.config import BenchConfig, OpOptions, ScoringOptions, command_line
    from sdpo_fast.bench.run import run_bench

    options = {"op": OpOptions(n=[2048], impls=["triton"])}
    if plan.dry:
        options = {"op": OpOptions(n=[64], hidden=64, vocab=1003, impls=["chunked"], warmup=0, repeats=1),
                   "scoring": ScoringOptions(shapes=["16x8"], g=2, demo=8, layers=1, hidden=32, warmup=0, repeats=1)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as tmp:
        cfg = BenchConfig(only=["op", "scoring"], **options)  # device "auto": the dry run hides the GPU
        command = command_line(cfg)  # before out_dir moves to the temporary folder: the plots are not kept
        cfg.out_dir = Path(tmp)
        record = run_bench(cfg)
    for name in ("op", "scoring"):
        record[name].pop("plot", None)
    tables = {name: report.TABLES[name](record[name]) for name in ("op", "scoring")}
    failed = [r for r in record["op"]["rows"] if r.get("error") and r["impl"] != "liger"]
    result = {"status": "failed" if failed else "ok",
              "figures": {"command": command, "tables": tables, "record": record}}
    if failed:
        result["reason"] = "; ".join(f"{r['impl']} N={r['n']}: {r['error']}" for r in failed[:3])
    return result


# ------------------------------------------------------------------------------------------------ tests
def _junit_counts(path: Path) -> dict:
    """Counts and ids from pytest's JUnit XML; collection errors (modules that could not be imported here, e.g.
    for a package this machine lacks) are kept apart from errors of tests that ran."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "collection_errors": [],
              "skip_reasons": {}}
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skip = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{test_id}: {(failure.get('message') or '')[:200]}")
        elif error is not None and not case.get("classname"):  # the traceback's last error line says why
            why = [re.sub(r"^E\s+", "", line.strip()) for line in (error.text or "").splitlines() if "Error" in line]
            counts["collection_errors"].append(f"{case.get('name')}: {(why or [error.get('message') or ''])[-1][:200]}")
        elif error is not None:
            counts["errors"] += 1
            counts["failures"].append(f"{test_id} (error): {(error.get('message') or '')[:200]}")
        elif skip is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "")[:120]
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def section_gpu_tests(plan: Plan, deadline: float) -> dict:
    """pytest -m gpu over tests/, then (on a GPU) the Triton kernel tests, which run on the device when one is
    there. Collection errors (a test module whose packages this machine lacks) are listed, not run."""
    if importlib.util.find_spec("pytest") is None:
        return skipped("pytest is not installed on this machine")
    if plan.dry:  # one module: collecting all of tests/ takes longer than the rest of a dry run
        runs = [("gpu-marked", ["-m", "gpu", "tests/train/test_telemetry.py"])]
    else:  # the GPU-marked tests, then the Triton kernel tests, which run on the device when there is one
        runs = [("gpu-marked", ["-m", "gpu", "tests"]),
                ("Triton kernels", ["tests/distill/test_triton_impl.py", "tests/distill/test_custom_ops.py"])]
    figures, bad = {}, []
    with tempfile.TemporaryDirectory(prefix="gpu-check-pytest-") as tmp:
        for i, (name, args) in enumerate(runs):
            left = deadline - time.time()
            if left < 10:
                figures[name] = {"status": "not run: time limit"}
                bad.append(name)
                continue
            xml = Path(tmp) / f"junit{i}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", *args]
            log = Path(tmp) / f"log{i}.txt"
            rc = run_logged([*cmd, f"--junitxml={xml}"], log, timeout=left / (len(runs) - i), cwd=Path.cwd())
            counts = _junit_counts(xml)
            figures[name] = {"command": "python " + " ".join(cmd[1:]), "returncode": rc, **counts,
                             "output_tail": tail(log, 1500)}
            collection_only = counts["collection_errors"] and not (counts["failed"] or counts["errors"])
            if rc is None or (rc not in (0, 5) and not collection_only):
                bad.append(name)
    return {"status": "failed" if bad else "ok", "figures": figures,
            **({"reason": f"failures or time limit in: {', '.join(bad)}"} if bad else {})}


# -------------------------------------------------------------------------------------------- resources
def section_resources(plan: Plan, deadline: float) -> dict:
    """The kernels' compile report (registers, spills, shared memory), when the checkout has one."""
    kernels = importlib.util.find_spec("sdpo_fast.kernels")  # imports sdpo_fast only, not the kernels (triton)
    if not any((Path(p) / name).exists() for p in kernels.submodule_search_locations
               for name in ("resources.py", "resources")):
        return skipped("not available: this checkout has no sdpo_fast.kernels.resources")
    if plan.dry:
        return skipped("dry run: the resource report is a CPU command of its own "
                       "(python -m sdpo_fast.kernels.resources)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-resources-") as tmp:
        log = Path(tmp) / "log.txt"
        # The fast subset (bf16, sm_90, every pickable config) with the machine's own triton; the full
        # matrix is a CPU command of its own and does not fit the device budget.
        args = ["-m", "sdpo_fast.kernels.resources", "--fast", "--jobs", str(min(8, os.cpu_count() or 1)), tmp]
        rc = run_logged([sys.executable, *args], log, timeout=deadline - time.time(), cwd=Path.cwd())
        output = tail(log, TAIL_CHARS)
    figures = {"command": "python " + " ".join(args[:-1]) + " DIR", "returncode": rc, "output_tail": output}
    if rc == 0:
        return ok(**figures)
    return {"status": "failed", "reason": "time limit" if rc is None else f"exit code {rc}", "figures": figures}


SECTIONS: dict[str, tuple[Callable[[Plan, float], dict], float, float]] = {  # name: (function, GPU s, dry-run s)
    "environment": (section_environment, 60, 60),
    "correctness": (section_correctness, 180, 120),
    "op_benchmark": (section_op_benchmark, 120, 60),
    "cuda_graph_triton": (functools.partial(section_cuda_graph, impl="triton"), 60, 30),
    "cuda_graph_chunked": (functools.partial(section_cuda_graph, impl="chunked"), 45, 30),
    "bench": (section_bench, 180, 90),
    "gpu_tests": (section_gpu_tests, 150, 60),
    "resources": (section_resources, 90, 30),
}


# ------------------------------------------------------------------------------------ subprocesses
def tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_logged(cmd: list[str], log: Path, timeout: float, cwd: Path, env: dict | None = None) -> int | None:
    """Run `cmd` in its own process group with stdout+stderr to `log`; its exit code, or None when it ran past
    `timeout` seconds (the whole group is then killed, so no grandchild outlives it)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return None
        finally:  # also when this process is being stopped: nothing of the group may outlive it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
