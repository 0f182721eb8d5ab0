"""Per-step metrics: a JSONL file (always), TensorBoard (when installed), and a PNG plot of the curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from sdpo_fast.files import save_figure, write_atomically

log = logging.getLogger(__name__)

# Curves the end-of-run plot shows first (when present), one panel each, in this order.
PLOT_KEYS = (
    "reward/mean", "eval/accuracy", "loss", "loss/divergence/mean", "loss/sdpo_advantage/mean",
    "loss/advantage/mean", "loss/entropy/mean", "response/length_mean", "response/truncated_frac",
    "throughput/tokens_per_s", "time/step_s",
)


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
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(path: Path, out: Path, keys: tuple[str, ...] = PLOT_KEYS) -> Path | None:
    """One panel per metric of `keys` found in the JSONL file; returns the PNG path (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        return None
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, out)


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (tensors and numpy numbers become floats)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed: metrics go to JSONL only")
        return None
    return SummaryWriter(str(log_dir))
