"""discovery@k: over runs (seeds x problems), the probability that a solution was found within k attempts.

A run is summarised by the attempt at which it first succeeded (1-based) or None (not within its budget);
discovery@k is the fraction of runs with a first success at attempt <= k. Only k up to the smallest budget
of the runs is defined (an unsolved run says nothing about attempts past its budget).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from sdpo_fast.files import save_figure


def discovery_at_k(first_success: Sequence[int | None], ks: Sequence[int]) -> list[float]:
    """discovery@k for each k in `ks` from the runs' first-success attempts (None: unsolved)."""
    if not first_success:
        raise ValueError("first_success must hold at least one run")
    for a in first_success:
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError(f"first_success entries must be None or attempts >= 1, got {a!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks must be positive ints, got {k!r}")
    n = len(first_success)
    return [sum(a is not None and a <= k for a in first_success) / n for k in ks]


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a fraction p of n runs."""
    return math.sqrt(p * (1.0 - p) / n) if n else float("nan")


def discovery_table(curves: dict[str, list[float]], ks: Sequence[int], runs: int) -> str:
    """A Markdown table: one row per k, one column per method (value +- standard error over `runs`)."""
    methods = list(curves)
    lines = ["| k | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for i, k in enumerate(ks):
        cells = [f"{curves[m][i]:.3f} ± {standard_error(curves[m][i], runs):.3f}" for m in methods]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_discovery(curves: dict[str, list[float]], ks: Sequence[int], runs: int, path: Path, title: str) -> None:
    """discovery@k curves (with +- one standard error bands) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in curves.items():
        err = [standard_error(v, runs) for v in values]
        ax.step(ks, values, where="post", label=method)
        ax.fill_between(ks, [v - e for v, e in zip(values, err)], [v + e for v, e in zip(values, err)],
                        step="post", alpha=0.15)
    ax.set_xlabel("attempts k")
    ax.set_ylabel("discovery@k")
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
