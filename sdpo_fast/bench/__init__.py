"""Repeatable measurements of the engine on the current device: the fused op, shared-prefix scoring, training
steps and the algorithm layer's own work.

`sdpo-fast bench` (`sdpo_fast.bench.run`) runs them with small defaults (options for larger grids) and writes
JSON and plots. Every measurement times with `common.median_times` and measures memory with `memory`;
benchmarks/test_bench_*.py time the same cases with pytest-benchmark and assert their memory and work ratios.
"""
