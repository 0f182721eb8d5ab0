"""Per-step metrics: the step's reward and response statistics, a JSONL file (always), TensorBoard (when
installed: `pip install 'sdpo-fast[tensorboard]'`), and a PNG plot of the curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sdpo_fast.files import save_figure, write_atomically

log = logging.getLogger(__name__)

# Curves the end-of-run plot shows (when present), one panel each, in this order.
PLOT_KEYS = (
    "reward/mean", "reward/success_frac", "eval/accuracy", "loss", "loss/divergence/mean",
    "loss/sdpo_advantage/mean", "loss/advantage/mean", "loss/kl/mean", "loss/entropy/mean", "grad_norm", "lr",
    "loss/clip_high_frac/mean", "loss/clip_low_frac/mean", "loss/is_clip_frac/mean", "reward/zero_std_group_frac",
    "response/length_mean", "response/truncated_frac", "throughput/tokens_per_s", "time/step_s",
)
# Per-step series are drawn as raw points under their exponential moving average, except these (not noisy).
SMOOTHING = 0.6
UNSMOOTHED = ("lr", "eval/accuracy")


class MetricsWriter:
    """Appends one JSON record per step to `path`; mirrors scalars to TensorBoard when available.

    With `resume_step`, records after that step (written by a run that crashed later) are dropped
    first, so a resumed run never duplicates steps.
    """

    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tb = _tensorboard(tensorboard_dir) if tensorboard_dir is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def rollout_metrics(rewards: list[float], lengths: list[int], truncated: list[bool], errors: list[bool], group: int,
                    success_threshold: float) -> dict:
    """The step's reward and response statistics over all rollouts (consecutive `group` rollouts share a prompt):
    reward mean/std/min/max, success fraction, fraction of groups whose rewards are all equal (no GRPO signal),
    response length mean/min/max, truncated fraction, and how many evaluations the environment failed."""
    r = np.asarray(rewards, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.float64)
    groups = r.reshape(-1, group)
    return {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()), "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "reward/success_frac": float(np.mean(r >= success_threshold)),
        "reward/zero_std_group_frac": float(np.mean(groups.max(1) == groups.min(1))),
        "response/length_mean": float(n.mean()), "response/length_min": float(n.min()),
        "response/length_max": float(n.max()),
        "response/truncated_frac": float(np.mean(truncated)),
        "env/errors": int(sum(errors)),
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(path: Path, out: Path, keys: tuple[str, ...] = PLOT_KEYS, title: str | None = None) -> Path | None:
    """One panel per metric of `keys` found in the JSONL file, under `title`: raw points and, from 5 points on,
    their exponential moving average; integer step ticks, plain numbers (no offset). Returns the PNG path (None
    if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    records = read_metrics(path)
    present = [k for k in keys if any(_number(r.get(k)) for r in records)]
    if not present:
        return None
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows + (0.4 if title else 0)), squeeze=False)
    for ax, key in zip(axes.flat, present):
        steps, values = zip(*[(r["step"], r[key]) for r in records if _number(r.get(key))])
        if len(values) >= 5 and key not in UNSMOOTHED:
            ax.plot(steps, values, "o", markersize=2.5, alpha=0.35, color="tab:blue")
            ax.plot(steps, smooth(values), color="tab:blue", linewidth=1.5)
        else:
            ax.plot(steps, values, "o-", markersize=3, color="tab:blue")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(key == "lr")
        ax.yaxis.set_major_formatter(formatter)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return save_figure(fig, out)


def smooth(values, weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average (the first value starts it), for the trend line over noisy points."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else weight * ema + (1 - weight) * v
        out.append(ema)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scalar(value: Any) -> Any:
    """A JSON-friendly scalar: tensors and numpy numbers become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed (pip install 'sdpo-fast[tensorboard]'): metrics go to JSONL only")
        return None
    return SummaryWriter(str(log_dir))
