"""Benchmarks: ``python -m bench.serve`` drives a running server; ``python -m bench.compare``
runs the batching and sequential schedulers side by side and writes the table."""
