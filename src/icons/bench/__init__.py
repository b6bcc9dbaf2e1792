"""Benchmarks (speed and memory are measured here, side by side, never in timed unit tests)."""
