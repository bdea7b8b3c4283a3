"""Benchmarks (run from a checkout): ``python -m bench [--quick] [--device cpu|cuda] [--out results.json]``."""
