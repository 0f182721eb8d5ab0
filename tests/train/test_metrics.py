"""Metrics JSONL, resume truncation and the PNG plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo_fast.train.metrics import MetricsWriter, plot_metrics, read_metrics


def test_jsonl_records_and_resume_drops_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 5):
        writer.log(step, {"reward/mean": step / 10, "loss": torch.tensor(1.0 / step)})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[1]["loss"] == 0.5

    resumed = MetricsWriter(path, resume_step=2)
    resumed.log(3, {"reward/mean": 0.9})
    resumed.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(path)] == [(1, 0.1), (2, 0.2), (3, 0.9)]

    fresh = MetricsWriter(path)  # a new run starts a new file
    fresh.close()
    assert read_metrics(path) == []


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_plot_writes_png_with_present_keys(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 6):
        writer.log(step, {"reward/mean": step, "eval/accuracy": 0.1 * step, "unplotted": 1})
    writer.close()
    png = plot_metrics(path, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(path, tmp_path / "none.png", keys=("missing",)) is None


def test_rollout_metrics_by_hand():
    from sdpo_fast.train.metrics import rollout_metrics

    m = rollout_metrics([1.0, 1.0, 0.0, 0.5, 0.2, 0.2], [3, 5, 1, 4, 2, 9], [False, True, False, False, False, True],
                        [False, False, True, False, False, False], 2, 0.5)
    assert m["reward/mean"] == pytest.approx(2.9 / 6)
    assert m["reward/std"] == pytest.approx(float(np.std([1.0, 1.0, 0.0, 0.5, 0.2, 0.2])))
    assert (m["reward/min"], m["reward/max"]) == (0.0, 1.0)
    assert m["reward/success_frac"] == pytest.approx(3 / 6)
    assert m["reward/zero_std_group_frac"] == pytest.approx(2 / 3)  # groups (1, 1) and (0.2, 0.2)
    assert (m["response/length_min"], m["response/length_max"], m["response/length_mean"]) == (1, 9, 4.0)
    assert m["response/truncated_frac"] == pytest.approx(2 / 6) and m["env/errors"] == 1


def test_plot_title_integer_steps_plain_axes_and_smoothing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdpo_fast.train import metrics

    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 8):
        writer.log(step, {"throughput/tokens_per_s": 1000.0 + 1e-4 * step, "grad_norm": step % 3, "lr": 1e-5})
    writer.close()
    figures = []
    real_save = metrics.save_figure
    metrics.save_figure = lambda fig, out: (figures.append(fig), real_save(fig, out))[1]
    try:
        metrics.plot_metrics(path, tmp_path / "c.png", title="run: sdpo on arithmetic, tiny-random")
    finally:
        metrics.save_figure = real_save
    fig = figures[0]
    assert fig._suptitle.get_text() == "run: sdpo on arithmetic, tiny-random"
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"grad_norm", "lr", "throughput/tokens_per_s"}
    ax = axes["throughput/tokens_per_s"]
    fig.canvas.draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""  # plain numbers, no "+1e3" offset
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert len(ax.lines) == 2 and len(axes["lr"].lines) == 1  # raw points + moving average; lr unsmoothed
    assert metrics.smooth([0.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75]
    plt.close(fig)


def test_tensorboard_gets_every_finite_scalar_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional extra)
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    writer.log(3, {"reward/mean": 0.5, "loss": float("nan"), "note": "text"})
    writer.close()
    assert calls == [("open", str(tmp_path / "tb")), ("reward/mean", 0.5, 3), ("close",)]
