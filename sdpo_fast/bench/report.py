"""Ratio tables and PNG plots of `sdpo-fast bench` results, with the published figures they compare to."""

from __future__ import annotations

from pathlib import Path

from sdpo_fast.files import save_figure

# Published figures (other hardware and shapes) the measured ratios are read against.
ANCHORS = {
    "op": [
        {"name": "Liger fused_linear_jsd vs torch (H100, H=4096, V=128256, N=8192)",
         "time_ratio": 182.6 / 195.3, "memory_ratio": 8.7 / 56.4},
        {"name": "Cut Cross-Entropy vs torch, loss+grad (A100, Gemma-2 2B, N=8192, V=256k)",
         "time_ratio": 135 / 207, "memory_ratio": 1164 / 28000},
    ],
    "scoring": [
        {"name": "shared-prefix step speed-ups reported for verl's Prefix Grouper (4-8k context)",
         "speedup_low": 1.14, "speedup_high": 1.7},
    ],
    "step": [
        {"name": "SDPO vs GRPO step time in the SDPO paper (+5.8% / +17.1%)", "ratio_low": 1.058,
         "ratio_high": 1.171},
    ],
}


def add_op_ratios(rows: list[dict]) -> None:
    """Set time_vs_naive / memory_vs_naive on every row with a naive row of the same N and alpha."""
    for row in rows:
        naive = next((r for r in rows if r["n"] == row["n"] and r["alpha"] == row["alpha"] and r["impl"] == "naive"
                      and r.get("ms")), None)
        if naive is None or not row.get("ms"):
            continue
        row["time_vs_naive"] = row["ms"] / naive["ms"]
        if row.get("extra_mb") is not None and naive.get("extra_mb"):
            row["memory_vs_naive"] = row["extra_mb"] / naive["extra_mb"]


def add_step_ratios(rows: list[dict]) -> None:
    """Set step_vs_grpo (and train_vs_grpo: score + update) on every row when a grpo row exists."""
    grpo = next((r for r in rows if r["algorithm"] == "grpo"), None)
    if grpo is None:
        return
    for row in rows:
        row["step_vs_grpo"] = row["step_s"] / grpo["step_s"]
        row["train_vs_grpo"] = (row["score_s"] + row["update_s"]) / (grpo["score_s"] + grpo["update_s"])


def _ratio(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}x"


def op_table(section: dict) -> str:
    chunk = f", chunk of {section['chunk_elems']} elements" if section.get("chunk_elems") else ""
    lines = [f"fused op linear_distill fwd+bwd: H={section['hidden']} V={section['vocab']} {section['dtype']}, "
             f"median of {section['repeats']}{chunk}; torch.mm {section['matmul_tflops']:.3g} TFLOP/s",
             f"{'N':>6} {'alpha':>5} {'impl':>8} {'ms':>10} {'TFLOP/s':>8} {'% mm':>6} {'extra MB':>9} "
             f"{'time/naive':>11} {'mem/naive':>10}"]
    for r in section["rows"]:
        if r.get("error"):
            lines.append(f"{r['n']:>6} {r['alpha']:>5} {r['impl']:>8}  {r['error']}")
            continue
        mem = f"{r['extra_mb']:9.0f}" if r.get("extra_mb") is not None else f"{'n/a':>9}"
        lines.append(f"{r['n']:>6} {r['alpha']:>5} {r['impl']:>8} {r['ms']:10.1f} {r['tflops']:8.3g} "
                     f"{r['pct_matmul']:6.1f} {mem} "
                     f"{_ratio(r.get('time_vs_naive')):>11} {_ratio(r.get('memory_vs_naive'), pct=True):>10}")
    for a in section["anchors"]:
        lines.append(f"  anchor: {a['name']}: time {_ratio(a['time_ratio'])}, memory {_ratio(a['memory_ratio'], True)}")
    return "\n".join(lines)


def scoring_table(section: dict) -> str:
    lines = [f"shared-prefix scoring: llama {section['layers']}x{section['hidden']} fp32, G={section['g']}, "
             f"demonstration {section['demo']} tokens, median of {section['repeats']}",
             f"{'shape':>8}  {'task':<16} {'variant':<22} {'tokens':>7} {'ms':>9} {'tokens saved':>12} "
             f"{'speed-up':>9}"]
    for r in section["rows"]:
        lines.append(f"{r['prompt']:>4}x{r['response']:<4} {r['task']:<16} {r['variant']:<22} {r['tokens']:>7} "
                     f"{r['ms']:9.1f} {r['token_ratio']:11.2f}x {r['speedup']:8.2f}x")
    for a in section["anchors"]:
        lines.append(f"  anchor: {a['name']}: {a['speedup_low']:.2f}x-{a['speedup_high']:.2f}x")
    return "\n".join(lines)


def step_table(section: dict) -> str:
    options = " ".join(f"{k}={v}" for k, v in section.get("task_options", {}).items())
    task = f"{section['task']} ({options})" if options else section["task"]
    lines = [f"training steps: {section['model']} on {task}, {section['prompts']} prompts x "
             f"{section['rollouts']} rollouts, <= {section['max_new_tokens']} new tokens, rollout "
             f"{section['rollout']}, median of {section['steps']} after {section['warmup']} warm-up",
             f"{'algorithm':>9} {'step s':>8} {'generate':>9} {'evaluate':>9} {'score':>8} {'update':>8} "
             f"{'tokens/s':>9} {'reward':>7} {'teacher tok':>11} {'step/grpo':>10} {'train/grpo':>11}"]
    for r in section["rows"]:
        lines.append(f"{r['algorithm']:>9} {r['step_s']:8.3f} {r['generate_s']:9.3f} {r['evaluate_s']:9.3f} "
                     f"{r['score_s']:8.3f} {r['update_s']:8.3f} {r['tokens_per_s']:9.0f} "
                     f"{r['reward']:7.2f} {r['teacher_tokens']:11.0f} "
                     f"{_ratio(r.get('step_vs_grpo')):>10} {_ratio(r.get('train_vs_grpo')):>11}")
    for a in section["anchors"]:
        lines.append(f"  anchor: {a['name']}: {a['ratio_low']:.3f}x-{a['ratio_high']:.3f}x")
    return "\n".join(lines)


def algorithm_table(section: dict) -> str:
    lines = [f"algorithm layer: median of {section['repeats']} after {section['warmup']} warm-up"]
    for r in section["rows"]:
        if r["case"] == "build_teacher_contexts":
            lines.append(f"  build_teacher_contexts, {r['rollouts']} rollouts: {r['teacher_rows']} teacher rows, "
                         f"{r['teacher_tokens']} tokens, {r['ms']:.1f} ms ({r['tokens_per_s'] / 1e6:.2f} M tokens/s)")
        else:
            vs = "" if r["case"] == "ema foreach lerp" else f" ({_ratio(r['vs_foreach'])} the foreach lerp)"
            lines.append(f"  {r['case']}, {r['params'] / 1e6:.0f}M fp32 params in {r['tensors']} tensors: "
                         f"{r['ms']:.1f} ms{vs}")
    return "\n".join(lines)


def plot_op(section: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    alphas = dict.fromkeys(r["alpha"] for r in section["rows"])
    for impl, alpha in dict.fromkeys((r["impl"], r["alpha"]) for r in section["rows"]):
        label = impl if len(alphas) == 1 else f"{impl} alpha={alpha}"
        rows = [r for r in section["rows"] if (r["impl"], r["alpha"]) == (impl, alpha) and r.get("ms")]
        if rows:
            ax_t.plot([r["n"] for r in rows], [r["ms"] for r in rows], marker="o", label=label)
        rows = [r for r in rows if r.get("extra_mb") is not None]
        if rows:
            ax_m.plot([r["n"] for r in rows], [r["extra_mb"] for r in rows], marker="o", label=label)
    for ax, title in ((ax_t, "forward + backward (ms)"), (ax_m, "memory beyond inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(f"linear_distill on {section['device']}: H={section['hidden']} V={section['vocab']}", fontsize=10)
    return _save(fig, path)


def plot_scoring(section: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in section["rows"] if r["variant"] != "unshared"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    labels = [f"{r['prompt']}x{r['response']} {r['task'].split()[0]} {r['variant']}" for r in rows]
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    for a in section["anchors"]:
        ax.axvspan(a["speedup_low"], a["speedup_high"], color="tab:green", alpha=0.15, label="reported elsewhere")
    ax.set_xlabel("speed-up vs unshared")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"shared-prefix scoring on {section['device']}", fontsize=10)
    return _save(fig, path)


def plot_step(section: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = section["rows"]
    phases = [p for p in ("generate_s", "evaluate_s", "score_s", "update_s", "weight_sync_s")
              if all(p in r for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(rows)
    for phase in phases:
        values = [r[phase] for r in rows]
        ax.bar([r["algorithm"] for r in rows], values, bottom=bottom, label=phase.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per step (median)")
    ax.legend(fontsize=8)
    ax.set_title(f"training step on {section['device']}: {section['model']}", fontsize=10)
    return _save(fig, path)


def plot_algorithm(section: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = section["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["ms"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["case"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median)")
    ax.set_title(f"algorithm layer on {section['device']}", fontsize=10)
    return _save(fig, path)


TABLES = {"op": op_table, "scoring": scoring_table, "step": step_table, "algorithm": algorithm_table}
PLOTS = {"op": plot_op, "scoring": plot_scoring, "step": plot_step, "algorithm": plot_algorithm}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)
