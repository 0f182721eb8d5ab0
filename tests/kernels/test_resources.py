"""The kernel resource report: compiles the kernels for real GPU targets with Triton's bundled ptxas.

No GPU is needed. The fast subset (bf16 on sm_90, every config the autotuners may pick) runs as CI's
check that no launchable variant spills or exceeds shared memory; the full matrix is
`python -m sdpo_fast.kernels.resources` (results in benchmarks/results/kernel_resources).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package")

from sdpo_fast.kernels import distill_backward, distill_forward, resources  # noqa: E402
from sdpo_fast.kernels.common import KernelConfigs, TileConfig  # noqa: E402

FIELDS = {"kernel", "variant", "config", "dtype", "target", "registers", "spill_bytes", "stack_bytes",
          "shared_bytes", "shared_limit", "ok"}


def _config_label(c: TileConfig) -> str:
    return f"{c.block_n}x{c.block_v}x{c.block_h} w{c.num_warps} s{c.num_stages}"


def test_fast_report_passes(tmp_path):
    """Every pickable bf16 config of every kernel variant compiles for sm_90 without spills and within
    shared memory. Run as a subprocess with the caller's environment (TRITON_INTERPRET=1 under `make
    test`: the module must still compile for the GPU target)."""
    proc = subprocess.run([sys.executable, "-m", "sdpo_fast.kernels.resources", str(tmp_path), "--fast",
                           "--jobs", "2"], capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_resources.json").read_text())
    rows = report["rows"]
    assert rows and all(FIELDS <= set(r) for r in rows)
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] <= 255 for r in rows)
    assert all(r["shared_bytes"] <= r["shared_limit"] == 232448 for r in rows)
    assert {r["target"] for r in rows} == {"sm_90"}
    assert report["summary"]["failing"] == 0 and report["summary"]["ok"] == len(rows)
    # One source of truth: the report compiled exactly the configs the autotuners are given.
    lists = {"stats": distill_forward.STATS_CONFIGS, "jsd": distill_forward.JSD_CONFIGS,
             "grad_logits": distill_backward.GRAD_LOGITS_CONFIGS, "grad_hidden": distill_backward.GRAD_H_CONFIGS}
    for kernel, configs in lists.items():
        for variant in resources.VARIANTS[kernel]:
            got = [r["config"].removesuffix(" (default)") for r in rows
                   if r["kernel"] == kernel and r["variant"] == variant]
            assert got == [_config_label(c) for c in configs.for_target(torch.bfloat16, 90)], (kernel, variant)
    assert "| kernel | variant |" in (tmp_path / "kernel_resources.md").read_text()


def test_spilling_config_is_reported():
    """A tile too large for the registers (two fp32 128 x 256 tiles) is flagged, not passed. Compiled in
    a child process without TRITON_INTERPRET (interpreted kernels cannot be compiled)."""
    code = (
        "from sdpo_fast.kernels import distill_forward as f, resources as r\n"
        "from sdpo_fast.kernels.common import KernelConfigs, TileConfig\n"
        "big = [TileConfig(128, 256, 64, 8, 2)]\n"
        "f.STATS_CONFIGS = KernelConfigs(half=big, fp32=big)\n"
        "row = r.compile_job(r.Job('stats', 'teacher', 0, 'bf16', 'sm_90'))\n"
        "assert not row['ok'] and row['spill_bytes'] > 0 and 'spill' in row['error'], row\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_only_defaults_are_pickable_without_tuning(monkeypatch):
    """Without SDPO_FAST_AUTOTUNE=1 each dtype runs its first config (same on every rank, no tuning);
    with it, the dtype's whole list."""
    from sdpo_fast.kernels import common

    configs = KernelConfigs(half=[TileConfig(64, 128, 64, 8, 3), TileConfig(64, 64, 64, 4, 3)],
                            fp32=[TileConfig(32, 64, 32, 4, 2)],
                            half_sm80=[TileConfig(128, 64, 64, 8, 3), TileConfig(64, 64, 32, 4, 2)])
    monkeypatch.setattr(common, "AUTOTUNE", False)
    assert configs.pickable(torch.bfloat16, 90) == configs.half[:1]
    assert configs.pickable(torch.bfloat16, 86) == configs.half_sm80[:1]  # pre-Hopper list
    assert configs.pickable(torch.float32, 80) == configs.fp32  # fp32: one list for every GPU
    monkeypatch.setattr(common, "AUTOTUNE", True)
    assert configs.pickable(torch.float16, 100) == configs.half
    assert configs.pickable(torch.float16, 80) == configs.half_sm80


def test_autotuner_prunes_to_the_launch_dtype(monkeypatch):
    """The autotuner's pruning (arguments arrive by keyword, as the launchers pass them) keeps the
    dtype's default without SDPO_FAST_AUTOTUNE, and the dtype's whole list with it."""
    import triton

    from sdpo_fast.kernels import common

    configs = distill_forward.STATS_CONFIGS
    candidates = [triton.Config({"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h},
                                num_warps=c.num_warps, num_stages=c.num_stages) for c in configs.all()]
    prune = common.dtype_prune(configs, "hs_ptr")
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "AUTOTUNE", False)
    for dtype, want in ((torch.bfloat16, configs.half[:1]), (torch.float32, configs.fp32[:1])):
        kept = prune(candidates, {}, hs_ptr=torch.empty(0, dtype=dtype), n_rows=5)
        assert [common._tile(c) for c in kept] == want
    monkeypatch.setattr(common, "AUTOTUNE", True)
    kept = prune(candidates, {}, hs_ptr=torch.empty(0, dtype=torch.float16))
    assert [common._tile(c) for c in kept] == configs.half
    # On a pre-Hopper GPU the launch's device selects the sm_80 list.
    monkeypatch.setattr(common, "device_capability", lambda device: 80)
    kept = prune(candidates, {}, hs_ptr=torch.empty(0, dtype=torch.bfloat16))
    assert [common._tile(c) for c in kept] == configs.for_target(torch.bfloat16, 80) != configs.half


def test_full_report_follows_the_per_target_lists():
    """The full matrix compiles, per target, the list a GPU of that compute capability would use."""
    jobs = resources.jobs(fast=False)
    lists = {"stats": distill_forward.STATS_CONFIGS, "jsd": distill_forward.JSD_CONFIGS,
             "grad_logits": distill_backward.GRAD_LOGITS_CONFIGS, "grad_hidden": distill_backward.GRAD_H_CONFIGS}
    for kernel, configs in lists.items():
        for target, (capability, _) in resources.TARGETS.items():
            for dtype in ("bf16", "fp16", "fp32"):
                got = [resources.job_launch(j)[1] for j in jobs if (j.kernel, j.variant, j.target, j.dtype)
                       == (kernel, resources.VARIANTS[kernel][0], target, dtype)]
                assert got == configs.for_target(resources.DTYPES[dtype], capability), (kernel, target, dtype)


def test_autotune_keys_do_not_move_with_token_count():
    """Neither the row count nor the split count (which follows it) is part of any autotuning key."""
    kernels = (distill_forward._stats_kernel, distill_forward._jsd_kernel, distill_backward._grad_logits_kernel,
               distill_backward._grad_hidden_kernel)
    for kernel in kernels:
        keys = getattr(kernel, "keys", None)
        assert keys is not None, f"{kernel} is not wrapped in an autotuner"
        assert not {"n_rows", "SPLITS", "v_begin", "v_end", "n_cols"} & set(keys), keys


def test_num_splits_fills_device_and_l2():
    """Enough splits for few rows, enough that resident row tiles' hidden states fit half of L2, and
    never more than one split per 512 columns; the same value for every row count above the fill point."""
    kw = dict(programs=264, l2_bytes=50 << 20)
    width = 8192  # H + H_t
    few = distill_forward.num_splits(64, 151936, width, 2, **kw)
    assert few == 264  # one row tile: every program its own split
    many = [distill_forward.num_splits(n, 151936, width, 2, **kw) for n in (16384, 16768, 65536)]
    assert len(set(many)) == 1
    resident_rows = 264 // many[0]
    assert resident_rows * 64 * width * 2 <= (50 << 20) // 2
    assert distill_forward.num_splits(64, 1000, width, 2, **kw) == 1
