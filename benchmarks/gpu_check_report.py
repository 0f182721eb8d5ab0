"""The report of benchmarks/gpu_check.py: the record as JSON, and as Markdown (header, one status line per
section, then each section's figures)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORT_NAME = "gpu_check"


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(record: dict) -> str:
    """The report as Markdown: header, one status line per section, then each section's figures."""
    env = record["sections"].get("environment", {}).get("figures", {})
    lines = [f"# GPU check{' (dry run on CPU: figures exercise the pipeline only)' if record['dry_run'] else ''}", "",
             f"- device: {env.get('device', '?')}; driver {env.get('driver')}; CUDA {env.get('cuda_runtime')}; "
             f"torch {env.get('torch')}; triton {env.get('triton')}; python {env.get('python')}",
             f"- commit: {record['commit']}{' (uncommitted changes)' if record['dirty'] else ''}; "
             f"source digest {record['source_digest']}; date {record['date']}",
             f"- command: `{record['command']}`; wall time {record.get('wall_s', '?')} s of a "
             f"{record['budget_s']} s budget",
             "", "| section | status | seconds | CPU seconds | note |", "|---|---|---:|---:|---|"]
    for name, sec in record["sections"].items():
        note = (sec.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', '-')} | {sec.get('cpu_s', '-')} | {note} |")
    for name, sec in record["sections"].items():
        figures = sec.get("figures") or {}
        if figures:
            lines += ["", f"## {name}", "", *_rendered(name, figures)]
        if sec.get("log_tail") or sec.get("traceback"):
            lines += ["", f"{name}: log tail", "", "```", (sec.get("traceback") or sec["log_tail"])[-1500:], "```"]
    return "\n".join(lines) + "\n"


def _rendered(name: str, figures: dict) -> list[str]:
    """The section's own rendering; its figures as JSON when it has none or they lack a field (e.g. a section
    cut short), so the report is always written."""
    try:
        return RENDER[name](figures)
    except (KeyError, TypeError, ValueError):
        return ["```", json.dumps(figures, indent=1, default=str)[:6000], "```"]


def _render_environment(f: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in f.items()]


def _render_correctness(f: dict) -> list[str]:
    lines = [f"{f['dtype']} inputs, H={f['hidden']}, V={f['vocab']}; reference: {f['reference']}. An output passes "
             f"when finite, zero on ignored rows, and max|err| <= the naive-{f['dtype']} error + "
             f"{f['tolerance']['rel']} x max|ref| + {f['tolerance']['abs']}. Relative L2 errors:", "",
             "| N | case | impl | outputs | worst err/bound | divergence or logp | d h_s | d W | pass |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple, list] = {}
    for r in f["rows"]:
        groups.setdefault((r["n"], r["case"], r["impl"]), []).append(r)
    for (n, case, impl), rows in groups.items():
        if "error" in rows[0]:
            lines.append(f"| {n} | {case} | {impl} | - | - | - | - | - | {rows[0]['error']} |")
            continue
        by = {r["field"]: r for r in rows}
        main = by.get("divergence") or by.get("logp")
        worst = max(r["max_abs_err"] / r["bound"] for r in rows)
        lines.append(f"| {n} | {case} | {impl} | {len(rows)} | {worst:.3g} | {_fmt(main['rel_l2_err'])} | "
                     f"{_fmt(by['d_student_hidden']['rel_l2_err'])} | {_fmt(by['d_weight']['rel_l2_err'])} | "
                     f"{'yes' if all(r['ok'] for r in rows) else 'NO'} |")
    if f.get("not_run"):
        lines.append(f"\nnot run (time limit): {', '.join(f['not_run'])}")
    return lines


def _render_op(f: dict) -> list[str]:
    lines = [f"{f['dtype']}, H={f['hidden']}, V={f['vocab']}, forward + backward, median of {f['repeats']} after "
             f"{f['warmup']} warm-up; TFLOP/s counts {f['flops_per_step']}; % mm {f['pct_matmul']}; square "
             f"{f['square_size']} mm {f['matmul_tflops_square']:.3g} TFLOP/s; memory: {f['memory']}; "
             f"Liger: {f['liger']}.", "",
             "| N | alpha | impl | ms | TFLOP/s | % mm | mm TFLOP/s | extra MB | time/naive |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in f["rows"]:
        if r["error"]:
            lines.append(f"| {r['n']} | {r['alpha']} | {r['impl']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['n']} | {r['alpha']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.3g} | "
                     f"{r['pct_matmul']:.1f} | {r['matmul_tflops_same_shape']:.3g} | {_fmt(r['extra_mb'], '.0f')} | "
                     f"{_fmt(r.get('time_vs_naive'), '.2f')} |")
    if f.get("not_run"):
        lines.append(f"\nnot run (time limit): {', '.join(f['not_run'])}")
    return lines


def _render_graph(f: dict) -> list[str]:
    lines = [f"impl={f['impl']}, N={f['n']}, H={f['hidden']}, V={f['vocab']}, {f['dtype']}: "
             f"{f['host_syncs_in_eager_step']} host synchronisations in one eager forward + backward "
             f"({'; '.join(f['sync_messages']) or 'none'}); captured: {f.get('captured')}"]
    if f.get("captured"):
        lines.append(f"; replay on new inputs vs eager: max |diff| {f['replay_max_abs_diff']} (bitwise equal: "
                     f"{f['bitwise_equal']}; tolerance {f['tolerance']} x max|eager|)")
    return ["".join(lines)]


def _render_bench(f: dict) -> list[str]:
    return [f"`{f['command']}`", "", "```", f["tables"]["op"], "", f["tables"]["scoring"], "```"]


def _render_tests(f: dict) -> list[str]:
    lines = []
    for name, r in f.items():
        if "passed" not in r:
            lines.append(f"- {name}: {r.get('status')}")
            continue
        lines.append(f"- {name} (`{r['command']}`): {r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                     f"{r['skipped']} skipped; exit code {r['returncode']}")
        lines += [f"  - {x}" for x in r["failures"][:20]]
        lines += [f"  - not collected: {x}" for x in r["collection_errors"]]
        lines += [f"  - skipped {c}: {reason}" for reason, c in r["skip_reasons"].items()]
    return lines


def _render_resources(f: dict) -> list[str]:
    return [f"`{f['command']}` exit code {f['returncode']}", "", "```", f["output_tail"][-2500:], "```"]


RENDER = {"environment": _render_environment, "correctness": _render_correctness, "op_benchmark": _render_op,
          "cuda_graph_triton": _render_graph, "cuda_graph_chunked": _render_graph, "bench": _render_bench,
          "gpu_tests": _render_tests, "resources": _render_resources}


def write_report(out: Path, record: dict) -> None:
    """gpu_check.json and gpu_check.md in `out` (each written whole, so a cut run leaves a readable one)."""
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{REPORT_NAME}.json", json.dumps(record, indent=1, default=str) + "\n"),
                       (out / f"{REPORT_NAME}.md", markdown(record))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
