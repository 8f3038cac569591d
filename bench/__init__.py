"""Benchmarks: ``python -m bench.serve`` drives a running server; ``python -m bench.compare``
runs the batching and sequential schedulers side by side and writes the table;
``python -m bench.gpu_check`` is the one-shot GPU check (eager vs CUDA graphs, driving the
engine without the HTTP layer); ``python -m bench.prefix_cache`` measures the prefix cache,
image cache and chunked prefill through the server (before/after)."""
