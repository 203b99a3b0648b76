"""Benchmarks of celery-throttled: ``python benchmarks/bench_cap.py`` (see its docstring)."""
