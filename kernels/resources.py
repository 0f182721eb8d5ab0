"""Resource report of the Triton kernels, compiled for real NVIDIA targets on any machine (no GPU needed).

    python -m sdpo_fast.kernels.resources [OUT_DIR] [--fast] [--jobs J]

Compiles every kernel x every constexpr variant the launchers can produce x every config its autotuner
may pick (the kernels' own `*_CONFIGS` lists, chosen per target as on a GPU of that compute capability)
x {bf16, fp16, fp32} x {sm_90, sm_80} with Triton's bundled ptxas, and writes `kernel_resources.json`
and `kernel_resources.md` to OUT_DIR (default benchmarks/results/kernel_resources). Each launch is
built by the launcher's own function (`*_launch`) on meta tensors of a representative shape (N = 8192,
H = H_t = 4096, V = 151936, 256 MiB backward workspace) and specialised by Triton's own argument binder,
so the compiled code is what the launcher would run (pointer alignment of 16 bytes as torch's CUDA
allocator gives, integer divisibility by 16 as those shapes have). Register allocation depends on the
Triton version (its bundled ptxas), which the report records.

A row is ok when it compiles, ptxas reports no spill stores or loads, and its shared memory fits the
target's per-block opt-in limit: sm_90 227 KiB (232448 bytes, H100/H200) and sm_80 163 KiB (166912
bytes, A100), CUDA's `sharedMemPerBlockOptin` of those GPUs. The exit status is 1 when any row is not
ok. `--fast` compiles bf16 on sm_90 only (every pickable config), for CI.

Registers, spill and stack bytes come from ptxas' verbose log of the very compilation; shared memory
from Triton's metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

DEFAULT_OUT_DIR = Path("benchmarks/results/kernel_resources")
TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The representative problem the launches are built for.
SHAPE = dict(n=8192, hidden=4096, hidden_t=4096, vocab=151936)
IGNORE_INDEX = -100


class Job(NamedTuple):
    kernel: str
    variant: str
    config_index: int  # index into the kernel's config list for the dtype; -1: the kernel has no configs
    dtype: str
    target: str


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _launch(kernel: str, variant: str, dtype: torch.dtype):
    """The launcher's Launch of `kernel`/`variant` on meta tensors of SHAPE, and its config lists."""
    from sdpo_fast.kernels import distill_backward as bwd
    from sdpo_fast.kernels import distill_forward as fwd

    n, h, ht_w, v = SHAPE["n"], SHAPE["hidden"], SHAPE["hidden_t"], SHAPE["vocab"]
    hs, ht = _meta(n, h, dtype=dtype), _meta(n, ht_w, dtype=dtype)
    w, wt = _meta(v, h, dtype=dtype), _meta(v, ht_w, dtype=dtype)
    targets = _meta(n, dtype=torch.int64)
    splits = fwd.num_splits(n, v, h + ht_w, hs.element_size(), programs=2 * 132, l2_bytes=50 << 20)
    part = _meta(fwd._STATS, splits, n, dtype=torch.float32)
    if kernel == "stats":
        teacher = variant == "teacher"
        launch = fwd.stats_launch(hs, ht if teacher else hs, w, wt if teacher else w, targets, part,
                                  temperature=1.0, ignore_index=IGNORE_INDEX, has_teacher=teacher)
        return launch, fwd.STATS_CONFIGS
    if kernel == "merge":
        return fwd.merge_launch(part, _meta(7, n, dtype=torch.float32), targets, ignore_index=IGNORE_INDEX), None
    if kernel == "jsd":
        lse = _meta(2, n, dtype=torch.float32)
        return fwd.jsd_launch(hs, ht, w, wt, targets, lse, part[:2], alpha=0.5, temperature=1.0,
                              ignore_index=IGNORE_INDEX), fwd.JSD_CONFIGS
    chunk = bwd.chunk_columns(n, v, hs.element_size(), bwd.DEFAULT_WORKSPACE_BYTES)
    g = _meta(n, chunk, dtype=dtype)
    if kernel == "grad_logits":
        alpha, has_div, has_logp = _GRAD_VARIANTS[variant]
        stats = _meta(5, n, dtype=torch.float32)
        return bwd.grad_logits_launch(hs, ht, w, wt, targets, stats, g, 0, alpha=alpha, temperature=1.0,
                                      ignore_index=IGNORE_INDEX, has_div=has_div, has_logp=has_logp), bwd.GRAD_LOGITS_CONFIGS
    if kernel == "grad_hidden":
        return bwd.grad_hidden_launch(g, w[:chunk], _meta(n, h, dtype=torch.float32)), bwd.GRAD_H_CONFIGS
    raise ValueError(f"unknown kernel {kernel!r}")


# Backward variants the launcher can produce: (alpha, has_div, has_logp). Without a divergence gradient
# the launcher uses one mode for every alpha, so "logp only" is a single variant.
_GRAD_VARIANTS = {
    "alpha=0 div+logp": (0.0, True, True), "alpha=1 div+logp": (1.0, True, True),
    "jsd div+logp": (0.5, True, True), "alpha=0 div": (0.0, True, False), "alpha=1 div": (1.0, True, False),
    "jsd div": (0.5, True, False), "logp only": (0.5, False, True),
}
VARIANTS = {
    "stats": ["teacher", "student-only"],
    "merge": ["-"],
    "jsd": ["-"],
    "grad_logits": list(_GRAD_VARIANTS),
    "grad_hidden": ["-"],
}


def jobs(fast: bool) -> list[Job]:
    """Every (kernel, variant, config, dtype, target) of the report (`fast`: bf16 on sm_90)."""
    dtypes = ["bf16"] if fast else list(DTYPES)
    targets = ["sm_90"] if fast else list(TARGETS)
    out = []
    for target in targets:
        for kernel, variants in VARIANTS.items():
            for dtype in dtypes:
                if kernel == "merge" and dtype != dtypes[0]:
                    continue  # fp32 statistics only: one compilation serves every input dtype
                for variant in variants:
                    _, configs = _launch(kernel, variant, DTYPES[dtype])
                    count = len(configs.for_target(DTYPES[dtype], TARGETS[target][0])) if configs else 0
                    out += [Job(kernel, variant, i, "any" if kernel == "merge" else dtype, target)
                            for i in (range(count) if count else [-1])]
    return out


def job_launch(job: Job):
    """The launch of `job` and its config: the kernel's list for the job's dtype and target, as the
    autotuner's pruning picks it on a GPU of that compute capability (None for kernels without configs)."""
    dtype = DTYPES["fp32" if job.dtype == "any" else job.dtype]
    launch, configs = _launch(job.kernel, job.variant, dtype)
    if configs is None:
        return launch, None
    return launch, configs.for_target(dtype, TARGETS[job.target][0])[job.config_index]


def compile_job(job: Job) -> dict:
    """Compile one job for its target and read its resources (a JSON row)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    capability, shared_limit = TARGETS[job.target]
    launch, tile = job_launch(job)
    args, options, config = dict(launch.args), {}, "-"
    if tile is not None:
        args.update(BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_H=tile.block_h)
        options = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
        config = (f"{tile.block_n}x{tile.block_v}x{tile.block_h} w{tile.num_warps} s{tile.num_stages}"
                  + (" (default)" if job.config_index == 0 else ""))
    fn = launch.kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    bound, spec, _ = create_function_from_signature(fn.signature, fn.params, backend)(**args)
    signature = {p.name: s[0] for p, s in zip(fn.params, spec)}
    constexprs = {(i,): bound[p.name] for i, (p, s) in enumerate(zip(fn.params, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    row = dict(kernel=job.kernel, variant=job.variant, config=config, dtype=job.dtype, target=job.target,
               registers=None, spill_bytes=None, stack_bytes=None, shared_bytes=None, shared_limit=shared_limit,
               ok=False, error=None)
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - the report records why a variant does not compile
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[-400:]}"
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not frame:
        row["error"] = "no ptxas resource line in the log"
        return row
    stores, loads = int(frame.group(2)), int(frame.group(3))
    row.update(registers=int(regs.group(1)), spill_bytes=max(stores, loads), stack_bytes=int(frame.group(1)),
               shared_bytes=int(compiled.metadata.shared))
    problems = ([f"spills {stores} B stores / {loads} B loads"] if stores or loads else []) + (
        [f"shared {row['shared_bytes']} B > {shared_limit} B"] if row["shared_bytes"] > shared_limit else [])
    row["ok"] = not problems
    row["error"] = "; ".join(problems) or None
    return row


def markdown(rows: list[dict], command: str, seconds: float, triton_version: str) -> str:
    """The report as a Markdown summary and table."""
    bad = [r for r in rows if not r["ok"]]
    lines = [
        "# Kernel resource report", "",
        f"`{command}`: {len(rows)} compilations, {len(rows) - len(bad)} ok, {len(bad)} failing "
        f"({seconds:.0f} s, Triton {triton_version}). "
        f"Shape N={SHAPE['n']}, H=H_t={SHAPE['hidden']}, V={SHAPE['vocab']}; "
        "shared-memory limits: sm_90 232448 B, sm_80 166912 B (per-block opt-in).", "",
        "| kernel | variant | config (BN x BV x BH, warps, stages) | dtype | target | registers | spill B | "
        "stack B | shared B | ok |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "yes" if r["ok"] else f"**no**: {r['error']}"
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['dtype']} | {r['target']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['stack_bytes']} | {r['shared_bytes']} | {ok} |")
    return "\n".join(lines) + "\n"


def run(out_dir: Path, fast: bool, workers: int) -> list[dict]:
    """Compile every job (in `workers` processes) and write the JSON and Markdown reports."""
    start = time.time()
    todo = jobs(fast)
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, todo))
    else:
        rows = [compile_job(j) for j in todo]
    seconds = time.time() - start
    command = "python -m sdpo_fast.kernels.resources" + (" --fast" if fast else "")
    import triton  # the compiler (and its bundled ptxas) the rows depend on

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(command=command, seconds=round(seconds, 1), triton=triton.__version__, shape=SHAPE,
                   shared_limits={t: lim for t, (_, lim) in TARGETS.items()}, total=len(rows),
                   ok=sum(r["ok"] for r in rows), failing=sum(not r["ok"] for r in rows))
    (out_dir / "kernel_resources.json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=1) + "\n")
    (out_dir / "kernel_resources.md").write_text(markdown(rows, command, seconds, triton.__version__))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo_fast.kernels.resources", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"directory for kernel_resources.json / .md (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--fast", action="store_true", help="bf16 on sm_90 only (every pickable config)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels decorated under the interpreter cannot be compiled: rerun without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "sdpo_fast.kernels.resources",
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    with tempfile.TemporaryDirectory(prefix="sdpo_fast_resources_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a private kernel cache (workers inherit it), removed after
        rows = run(args.out_dir, args.fast, args.jobs)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} compilations, {len(rows) - len(bad)} ok, {len(bad)} failing -> {args.out_dir}")
    for r in bad:
        print(f"FAIL {r['kernel']} [{r['variant']}] {r['config']} {r['dtype']} {r['target']}: {r['error']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
