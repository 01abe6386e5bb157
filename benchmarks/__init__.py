"""Benchmarks: each `python -m benchmarks.NAME` builds its own data and prints a markdown table."""
