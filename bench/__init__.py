"""Benchmarks: bench/run.py."""
