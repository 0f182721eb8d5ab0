"""`sdpo-fast bench` on CPU with tiny shapes: every section runs, ratio tables print, JSON and PNGs land; the
op case's options and the child-process memory harness."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from sdpo_fast.bench.config import BenchConfig, command_line
from sdpo_fast.bench.memory import PeakMemory, in_child
from sdpo_fast.bench.op import make_inputs, make_step, measure
from sdpo_fast.cli import main, parse

# op: [N, V] logits of 8 MB, so that peak RSS tells the paths apart; the chunked one in blocks of 32 rows
TINY = ["--op.n", "256", "--op.hidden", "32", "--op.vocab", "8191", "--op.repeats", "1", "--op.chunk-elems", "262112",
        "--scoring.shapes", "24x8", "--scoring.g", "3", "--scoring.demo", "8", "--scoring.layers", "1",
        "--scoring.hidden", "32", "--scoring.warmup", "0", "--scoring.repeats", "1",
        "--step.prompts", "1", "--step.rollouts", "2", "--step.max-new-tokens", "4", "--step.warmup", "0",
        "--step.steps", "1", "--step.task-options", "digits", "1",
        "--algorithm.prompts", "2", "--algorithm.group", "2", "--algorithm.warmup", "0", "--algorithm.repeats", "1",
        "--device", "cpu", "--threads", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_on_cpu_writes_ratios_json_and_plots(tmp_path, capsys):
    main(["bench", "--out-dir", str(tmp_path), *TINY])
    printed = capsys.readouterr().out
    for title in ("fused op linear_distill", "shared-prefix scoring", "training steps", "anchor: Liger",
                  "anchor: SDPO vs GRPO", "algorithm layer", "chunk of 262112 elements"):
        assert title in printed

    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["device_type"] == "cpu" and record["commit"] and record["date"]
    assert record["command"].startswith("sdpo-fast bench --out-dir")
    op = {r["impl"]: r for r in record["op"]["rows"]}
    assert set(op) == {"naive", "chunked"} and op["naive"]["time_vs_naive"] == 1.0
    assert op["chunked"]["ms"] > 0 and op["naive"]["extra_mb"] > 8 and 0 < op["chunked"]["memory_vs_naive"] < 0.5
    assert record["op"]["chunk_elems"] == 262112 and record["torch_threads"] == 1

    scoring = record["scoring"]["rows"]
    variants = {(r["task"], r["variant"]) for r in scoring}
    assert ("student fwd+bwd", "shared segments") in variants and ("teacher no-grad", "shared dense +KV") in variants
    for r in scoring:
        assert r["speedup"] > 0 and r["token_ratio"] >= 1.0
        if r["variant"] == "unshared":
            assert r["speedup"] == 1.0
        else:
            unshared = [u for u in scoring if u["task"] == r["task"] and u["variant"] == "unshared"]
            assert r["tokens"] < unshared[0]["tokens"]

    step = {r["algorithm"]: r for r in record["step"]["rows"]}
    assert step["grpo"]["step_vs_grpo"] == 1.0 and step["sdpo"]["step_vs_grpo"] > 0
    assert step["sdpo"]["step_s"] >= step["sdpo"]["score_s"] > 0
    assert step["sdpo"]["teacher_tokens"] > 0 and step["grpo"]["teacher_tokens"] == 0
    assert 0.0 <= step["sdpo"]["reward"] <= 1.0
    assert record["step"]["task_options"] == {"digits": "1"} and "arithmetic (digits=1)" in printed
    assert not any(k.startswith("gpu") for r in step.values() for k in r)  # telemetry absent on CPU

    algorithm = {r["case"]: r for r in record["algorithm"]["rows"]}
    contexts = algorithm["build_teacher_contexts"]
    assert contexts["rollouts"] == 4 and contexts["teacher_tokens"] > 0 and contexts["ms"] > 0
    lerp, loop = algorithm["ema foreach lerp"], algorithm["ema per-parameter mul_/add_"]
    assert lerp["params"] == loop["params"] > 134e6 and loop["vs_foreach"] == loop["ms"] / lerp["ms"]

    for name in ("op", "scoring", "step", "algorithm"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_bench_command_line_reproduces_the_config():
    cfg = parse(BenchConfig, ["--only", "op", "step", "--op.n", "8", "16", "--step.task-options", "digits", "1",
                              "--step.max-new-tokens", "5"], prog="t")
    command = command_line(cfg)
    assert command == "sdpo-fast bench --only op step --op.n 8 16 --step.task-options digits 1 --step.max-new-tokens 5"
    assert parse(BenchConfig, shlex.split(command)[2:], prog="t") == cfg


@pytest.mark.parametrize("flags,name", [(["--scoring.shapes", "64by8"], "scoring.shapes"),
                                        (["--op.alpha", "0.5", "2"], "op.alpha"),
                                        (["--op.chunk-elems", "0"], "op.chunk_elems"),
                                        (["--op.mem-limit-gb", "0"], "op.mem_limit_gb"),
                                        (["--threads", "0"], "threads")])
def test_bench_rejects_bad_options(capsys, flags, name):
    with pytest.raises(SystemExit):
        parse(BenchConfig, flags, prog="sdpo-fast bench")
    assert name in capsys.readouterr().err


def test_op_case_runs_each_alpha_and_a_block_size_of_the_chunked_path_only():
    x = make_inputs(16, 8, 31, torch.float32, "cpu")
    with pytest.raises(ValueError, match="chunk_elems applies to impl 'chunked' only"):
        make_step("naive", x, 0.5, chunk_elems=31)
    grads = []
    for chunk in (None, 31):  # one row per block, or all rows in one
        make_step("chunked", x, 0.5, chunk_elems=chunk)()
        grads.append(x["w"].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    rows = [measure("chunked", 16, alpha, hidden=8, vocab=31, dtype=torch.float32, device="cpu", warmup=0, repeats=1)
            for alpha in (0.0, 1.0)]
    assert [r.alpha for r in rows] == [0.0, 1.0] and all(r.ms > 0 and r.extra_mb is None for r in rows)


def _allocate(mb: int) -> dict:
    block = bytearray(mb << 20)  # zero-filled: every page is touched
    return {"mb": len(block) >> 20}


def test_child_harness_measures_peak_rss_and_reports_out_of_memory():
    assert in_child(_allocate, 64, mem_limit_gb=4) == {"mb": 64}
    assert in_child(_allocate, 8192, mem_limit_gb=2) == {"error": "out of memory"}
    memory = PeakMemory("cpu")
    block = bytearray(256 << 20)
    assert memory.extra_bytes() >= 200 << 20
    del block
    with pytest.raises(ValueError, match="mem_limit_gb"):
        in_child(_allocate, 1, mem_limit_gb=0)
