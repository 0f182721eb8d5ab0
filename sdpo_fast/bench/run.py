"""`sdpo-fast bench`: the op, scoring, step and algorithm-layer benchmarks that run on this device, in one command.

CPU: `linear_distill` naive vs chunked (time and peak RSS, each in its own process), shared-prefix scoring
(dense and segments backends) vs the unshared batch, training steps SDPO vs GRPO, and teacher-context
building and the EMA teacher update. CUDA adds the Triton op (and Liger-Kernel's fused JSD when installed)
and the FlexAttention scoring backend. Prints ratio tables next to published anchors, and writes
`bench.json` (device, date, commit, command, every row) and one PNG per section into the output directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from sdpo_fast.bench import report
from sdpo_fast.bench.common import device_name, git_commit
from sdpo_fast.bench.config import (AlgorithmOptions, BenchConfig, OpOptions, ScoringOptions, StepOptions,
                                    command_line)
from sdpo_fast.files import plain, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def op_plan(opts: OpOptions, device: str) -> dict:
    """The op section's shapes and implementations on `device` (the options' None fields resolved)."""
    gpu = device == "cuda"
    if gpu:
        liger = ["liger"] if importlib.util.find_spec("liger_kernel") else []
        impls = opts.impls or ["triton", "chunked", "naive", *liger]
    else:
        impls = opts.impls or ["naive", "chunked"]
    return {"n": opts.n or ([2048, 8192] if gpu else [256, 1024]), "hidden": opts.hidden or (4096 if gpu else 512),
            "vocab": opts.vocab or (151936 if gpu else 32000), "impls": impls,
            "dtype": opts.dtype if gpu else "fp32"}


def run_op(opts: OpOptions, device: str, bar: tqdm) -> dict:
    from sdpo_fast.bench.op import matmul_tflops, measure, measure_isolated

    plan = op_plan(opts, device)
    dtype = DTYPES[plan["dtype"]]
    mm_rate = matmul_tflops(device, dtype, 8192 if device == "cuda" else 1024, opts.warmup, opts.repeats)
    rows = []
    for n in plan["n"]:
        for alpha in opts.alpha:
            for impl in plan["impls"]:
                bar.set_postfix_str(f"op {impl} N={n} alpha={alpha}")
                chunk_elems = opts.chunk_elems if impl == "chunked" else None
                shape = dict(hidden=plan["hidden"], vocab=plan["vocab"], warmup=opts.warmup, repeats=opts.repeats,
                             mm_rate=mm_rate, chunk_elems=chunk_elems)
                if device == "cuda":
                    row = measure(impl, n, alpha, dtype=dtype, device=device, **shape)
                else:  # a child process per case: its peak RSS is the op's memory
                    row = measure_isolated(impl, n, alpha, mem_limit_gb=opts.mem_limit_gb, **shape)
                rows.append(dataclasses.asdict(row))
                bar.update(1)
    report.add_op_ratios(rows)
    return {**plan, "alpha": opts.alpha, "chunk_elems": opts.chunk_elems, "warmup": opts.warmup,
            "repeats": opts.repeats, "matmul_tflops": mm_rate,
            "memory": "peak CUDA memory beyond inputs and d(weight)" if device == "cuda"
            else f"peak RSS of a child process beyond its inputs (d(weight) included), address space "
                 f"limited to {opts.mem_limit_gb:g} GB",
            "rows": rows, "anchors": report.ANCHORS["op"]}


def run_scoring(opts: ScoringOptions, device: str, bar: tqdm) -> dict:
    from sdpo_fast.bench.scoring import run_shape, scoring_model

    backends = opts.backends or (["dense", "segments", "flex"] if device == "cuda" else ["dense", "segments"])
    model = scoring_model(opts.hidden, opts.layers, device)
    rows = []
    for shape in opts.shapes:
        prompt, response = (int(x) for x in shape.split("x"))
        bar.set_postfix_str(f"scoring {shape}")
        rows += run_shape(model, prompt, response, g=opts.g, demo=opts.demo, backends=backends,
                          max_row_tokens=opts.max_row_tokens, warmup=opts.warmup, repeats=opts.repeats)
        bar.update(1)
    return {**dataclasses.asdict(opts), "backends": backends, "rows": rows, "anchors": report.ANCHORS["scoring"]}


def run_step(opts: StepOptions, device: str, bar: tqdm) -> dict:
    from sdpo_fast.bench.step import run_steps, step_config

    bar.set_postfix_str(f"steps sdpo vs grpo on {opts.model}")
    with tempfile.TemporaryDirectory(prefix="sdpo-fast-bench-") as tmp:
        configs = {name: step_config(name, model=opts.model, task=opts.task, task_options=opts.task_options,
                                     prompts=opts.prompts, rollouts=opts.rollouts, max_new_tokens=opts.max_new_tokens,
                                     micro_batch_size=opts.micro_batch_size, device=device, rollout=opts.rollout,
                                     output_dir=Path(tmp) / name)
                   for name in ("sdpo", "grpo")}
        rows = run_steps(configs, warmup=opts.warmup, steps=opts.steps, tick=lambda: bar.update(1))
    report.add_step_ratios(rows)
    return {**dataclasses.asdict(opts), "rows": rows, "anchors": report.ANCHORS["step"]}


def run_algorithm(opts: AlgorithmOptions, device: str, bar: tqdm) -> dict:
    from sdpo_fast.bench.algorithm import ema_rows, teacher_contexts_row

    bar.set_postfix_str("algorithm: teacher contexts")
    rows = [teacher_contexts_row(opts.prompts, opts.group, opts.warmup, opts.repeats)]
    bar.update(1)
    bar.set_postfix_str("algorithm: EMA update")
    rows += ema_rows(device, opts.warmup, opts.repeats)
    bar.update(1)
    return {**dataclasses.asdict(opts), "rows": rows}


RUNNERS = {"op": run_op, "scoring": run_scoring, "step": run_step, "algorithm": run_algorithm}


def run_bench(cfg: BenchConfig) -> dict:
    """Run the sections of `cfg`, print their tables, write bench.json and the plots; returns the record."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    sections = list(dict.fromkeys(cfg.only))
    plan = op_plan(cfg.op, device)
    ticks = {"op": len(plan["n"]) * len(cfg.op.alpha) * len(plan["impls"]), "scoring": len(cfg.scoring.shapes),
             "step": 2 * (cfg.step.warmup + cfg.step.steps), "algorithm": 2}
    record = {
        "device": device_name(device), "device_type": device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "command": command_line(cfg), "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1m": {"start": os.getloadavg()[0]},  # other jobs on the machine skew absolute times
        "config": plain(dataclasses.asdict(cfg)),
    }
    out = Path(cfg.out_dir)
    with tqdm(total=sum(ticks[s] for s in sections), desc="sdpo-fast bench", unit="case", dynamic_ncols=True) as bar:
        for name in sections:
            record[name] = {"device": record["device"], **RUNNERS[name](getattr(cfg, name), device, bar)}
    record["load_average_1m"]["end"] = os.getloadavg()[0]
    for name in sections:
        print("\n" + report.TABLES[name](record[name]))
        record[name]["plot"] = str(report.PLOTS[name](record[name], out / f"{name}.png"))
    write_json(out / "bench.json", record)
    print(f"\nwrote {out / 'bench.json'} and {', '.join(f'{s}.png' for s in sections)}")
    return record
