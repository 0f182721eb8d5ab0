"""Benchmarks of the engine on the current device: the fused op, shared-prefix scoring and training steps.

`sdpo-fast bench` (`sdpo_fast.bench.run`) runs them all with small defaults and writes JSON and plots; the
scripts in benchmarks/ run one each over larger grids, and benchmarks/test_bench_*.py time the same cases
with pytest-benchmark.
"""
