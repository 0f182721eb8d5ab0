"""pytest-benchmark: shared-prefix scoring against the unshared batch (the scoring case of `sdpo-fast bench`):
student forward + backward and teacher no-grad, per backend, timed, with the work ratio that is the point of
sharing: every shared variant computes fewer token positions than the unshared batch, and continuing from
the student's prompt keys/values fewer still."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.bench.scoring import STUDENT, TEACHER, scoring_model, scoring_variants

CUDA = torch.cuda.is_available()
BACKENDS = ["dense", "segments", "flex"] if CUDA else ["dense", "segments"]
SHAPE = (512, 256) if CUDA else (64, 32)  # prompt, response tokens
VARIANTS = [(STUDENT, "unshared"), (TEACHER, "unshared")] + [
    (task, f"shared {b}{suffix}") for b in BACKENDS
    for task, suffix in ((STUDENT, ""), (TEACHER, ""), (TEACHER, " +KV"))]


@pytest.fixture(scope="module")
def variants():
    model = scoring_model(hidden=128, layers=2, device="cuda" if CUDA else "cpu")
    return scoring_variants(model, *SHAPE, g=8, demo=32, backends=BACKENDS, max_row_tokens=8192)


@pytest.mark.parametrize("task,variant", VARIANTS, ids=[f"{t.split()[0]}-{v}" for t, v in VARIANTS])
def test_scoring(benchmark, variants, task, variant):
    benchmark.group = f"{task} {SHAPE[0]}x{SHAPE[1]} G=8"
    fn, tokens = variants[(task, variant)]
    unshared = variants[(task, "unshared")][1]
    benchmark.extra_info.update(tokens=tokens, token_ratio=unshared / tokens)

    def run() -> None:
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=1, rounds=5)

    if variant != "unshared":
        assert tokens < unshared
    if variant.endswith("+KV"):
        assert tokens < variants[(task, variant.removesuffix(" +KV"))][1]
