"""benchmarks/gpu_check.py (`make gpu-check`): its CPU dry run end to end, and how it contains failures.

The dry run takes the same path as on a GPU machine (the checkout imported in place, every section in its own
process, one JSON + one Markdown report) with tiny shapes, the Triton interpreter and no CUDA.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script's module (benchmarks/ is not a package: it goes on sys.path, as when the script runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPT.parent))
        yield importlib.import_module("gpu_check")
    for name in ("gpu_check", "gpu_check_sections", "gpu_check_report"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def sections(gpu_check):
    return importlib.import_module("gpu_check_sections")  # imported by gpu_check


@pytest.fixture(scope="module")
def report_module(gpu_check):
    return importlib.import_module("gpu_check_report")  # imported by gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    return proc, out


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


@pytest.mark.slow  # every section in its own process: about 35 CPU seconds
def test_dry_run_report(dry_run, gpu_check, sections):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert record["dry_run"] is True and record["commit"] and record["source_digest"]
    results = record["sections"]
    assert list(results) == list(sections.SECTIONS)
    for name in ("environment", "correctness", "op_benchmark", "bench", "gpu_tests"):
        assert results[name]["status"] == "ok", (name, results[name])
    for name in ("cuda_graph_triton", "cuda_graph_chunked"):
        assert results[name]["status"] == "skipped" and "CUDA" in results[name]["reason"]
    assert results["resources"]["status"] in ("ok", "skipped")
    assert all(0 <= s["seconds"] <= s["timeout_s"] and s["cpu_s"] >= 0 for s in results.values())  # within budget
    assert all(math.isfinite(x) for x in _numbers(record))

    env = results["environment"]["figures"]
    # imported in place from the temporary tree of links, as on a machine where nothing is installed
    assert env["kernels_from"].endswith("src/sdpo_fast/kernels") and not env["kernels_from"].startswith(str(REPO))

    rows = results["correctness"]["figures"]["rows"]
    checked = {(r["case"], r["impl"]) for r in rows}
    for case in sections.CASES:
        impls = ("triton", "chunked") if case.topk is None else ("chunked",)
        assert {(case.name, impl) for impl in (*impls, "naive (baseline)")} <= checked
    assert all(r["ok"] for r in rows)
    fields = {r["field"] for r in rows}
    assert {"divergence", "student_logp", "advantage", "logp", "d_student_hidden", "d_weight"} <= fields

    bench_rows = results["op_benchmark"]["figures"]["rows"]
    assert {r["impl"] for r in bench_rows} >= {"triton", "chunked", "naive"}
    assert all(r["error"] is None and r["ms"] > 0 and r["tflops"] > 0 for r in bench_rows)
    bench = results["bench"]["figures"]
    assert bench["command"].startswith("sdpo-fast bench --only op scoring")
    assert bench["record"]["op"]["rows"] and bench["record"]["scoring"]["rows"]
    tests = results["gpu_tests"]["figures"]["gpu-marked"]
    assert tests["returncode"] == 0 and tests["skipped"] >= 1 and tests["failed"] == 0

    md = (out / "gpu_check.md").read_text()
    assert "dry run" in md and record["commit"] in md
    for name in results:
        assert f"| {name} | {results[name]['status']} | {results[name]['seconds']} |" in md


def test_a_section_past_its_time_limit_is_killed_and_recorded(gpu_check, tmp_path):
    root = gpu_check.source_tree(REPO, tmp_path / "src")
    start = time.time()
    result = gpu_check.run_section("correctness", root, tmp_path, timeout=1, dry=True)
    assert result["status"] == "timeout" and result["returncode"] is None
    assert time.time() - start < 30


def test_a_failing_section_becomes_its_result(gpu_check, tmp_path, monkeypatch):
    def broken(plan, deadline):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(gpu_check.SECTIONS, "environment", (broken, 1, 1))  # the dict the child looks up
    gpu_check.run_child("environment", tmp_path / "r.json", time.time() + 60, dry=False)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["status"] == "error" and result["reason"] == "RuntimeError: boom" and "boom" in result["traceback"]


def test_junit_counts_keep_collection_errors_apart(sections, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="" name="tests.test_envs_code"><error message="collection failure">tests/x.py:3: in &lt;module&gt;
    import pebble
E   ModuleNotFoundError: No module named 'pebble'</error></testcase>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.test_a" name="test_setup"><error message="fixture"/></testcase>
      <testcase classname="tests.test_a" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    counts = sections._junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert counts["collection_errors"] == ["tests.test_envs_code: ModuleNotFoundError: No module named 'pebble'"]
    assert counts["skip_reasons"] == {"needs a CUDA GPU": 1}


def test_bad_arguments_are_one_line_errors(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--budget-s", "0"])


def test_markdown_of_gpu_only_sections(report_module):
    """The renderings the dry run cannot reach (graph capture, the resource report, a cut-short section)."""
    graph = {"impl": "triton", "n": 2048, "hidden": 4096, "vocab": 151936, "dtype": "bf16",
             "host_syncs_in_eager_step": 2, "sync_messages": ["called a synchronizing CUDA operation"]}
    record = {"dry_run": False, "commit": "abc", "dirty": False, "source_digest": "d", "date": "today",
              "command": "python3 benchmarks/gpu_check.py --out x", "budget_s": 480, "wall_s": 1.0, "sections": {
                  "cuda_graph_triton": {"status": "failed", "reason": "capture failed: RuntimeError: x", "seconds": 3,
                                        "figures": {**graph, "captured": False}},
                  "cuda_graph_chunked": {"status": "ok", "seconds": 4, "figures": {
                      **graph, "impl": "chunked", "captured": True, "replay_max_abs_diff": {"divergence": 0.0},
                      "bitwise_equal": True, "tolerance": 1e-5}},
                  "resources": {"status": "ok", "seconds": 5, "figures": {
                      "command": "python -m sdpo_fast.kernels.resources", "returncode": 0, "output_tail": "0 failing"}},
                  "op_benchmark": {"status": "timeout", "reason": "killed after 120 s", "seconds": 120,
                                   "figures": {"rows": []}, "log_tail": "last line"}}}
    md = report_module.markdown(record)
    assert "| cuda_graph_triton | failed | 3 | - | capture failed: RuntimeError: x |" in md
    assert "2 host synchronisations" in md and "captured: False" in md and "bitwise equal: True" in md
    assert "0 failing" in md and "last line" in md
    assert '"rows": []' in md  # a section cut short before its header figures: shown as JSON
