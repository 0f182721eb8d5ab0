"""`sdpo-fast bench` on CPU with tiny shapes: every section runs, ratio tables print, JSON and PNGs land."""

from __future__ import annotations

import json
import shlex

import pytest

from sdpo_fast.bench.config import BenchConfig, command_line
from sdpo_fast.cli import main, parse

TINY = ["--op.n", "48", "--op.hidden", "32", "--op.vocab", "257", "--op.repeats", "1",
        "--scoring.shapes", "24x8", "--scoring.g", "3", "--scoring.demo", "8", "--scoring.layers", "1",
        "--scoring.hidden", "32", "--scoring.warmup", "0", "--scoring.repeats", "1",
        "--step.prompts", "1", "--step.rollouts", "2", "--step.max-new-tokens", "4", "--step.warmup", "0",
        "--step.steps", "1", "--step.task-options", "digits", "1", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_on_cpu_writes_ratios_json_and_plots(tmp_path, capsys):
    main(["bench", "--out-dir", str(tmp_path), *TINY])
    printed = capsys.readouterr().out
    for title in ("fused op linear_distill", "shared-prefix scoring", "training steps", "anchor: Liger",
                  "anchor: SDPO vs GRPO"):
        assert title in printed

    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["device_type"] == "cpu" and record["commit"] and record["date"]
    assert record["command"].startswith("sdpo-fast bench --out-dir")
    op = {r["impl"]: r for r in record["op"]["rows"]}
    assert set(op) == {"naive", "chunked"} and op["naive"]["time_vs_naive"] == 1.0
    assert op["chunked"]["ms"] > 0 and op["chunked"]["memory_vs_naive"] > 0 and op["chunked"]["extra_mb"] >= 0

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

    for name in ("op", "scoring", "step"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_bench_command_line_reproduces_the_config():
    cfg = parse(BenchConfig, ["--only", "op", "step", "--op.n", "8", "16", "--step.task-options", "digits", "1",
                              "--step.max-new-tokens", "5"], prog="t")
    command = command_line(cfg)
    assert command == "sdpo-fast bench --only op step --op.n 8 16 --step.task-options digits 1 --step.max-new-tokens 5"
    assert parse(BenchConfig, shlex.split(command)[2:], prog="t") == cfg


def test_bench_rejects_a_bad_shape(capsys):
    with pytest.raises(SystemExit):
        parse(BenchConfig, ["--scoring.shapes", "64by8"], prog="sdpo-fast bench")
    assert "scoring.shapes" in capsys.readouterr().err
