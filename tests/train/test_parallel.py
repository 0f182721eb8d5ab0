"""Reductions over ranks (`sdpo_fast.train.parallel`) on two gloo ranks."""

from __future__ import annotations

import math

import torch

from sdpo_fast.train.parallel import concat_over_ranks, mean_over_ranks, sum_over_ranks
from tests.conftest import FORK_ONLY, run_two_ranks


def _reductions_worker(rank: int, mesh) -> None:
    nan = float("nan")
    # "auc" is undefined on rank 1 (no pairs there), "none" on both ranks
    mine = {"loss": [1.0, 3.0][rank], "auc": [0.75, nan][rank], "none": nan}
    means = mean_over_ranks(mine, torch.device("cpu"))
    assert means["loss"] == 2.0 and means["auc"] == 0.75 and math.isnan(means["none"]), means
    assert sum_over_ranks([10, 5][rank], torch.device("cpu")) == 15
    assert concat_over_ranks([(rank, "a"), (rank, "b")]) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


@FORK_ONLY
def test_reductions_over_two_ranks_skip_undefined_values():
    run_two_ranks(_reductions_worker)
