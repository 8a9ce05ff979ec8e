"""fastdiff benchmarks: pytest-benchmark suites, profiling scripts and results (see BENCHMARKS.md)."""
