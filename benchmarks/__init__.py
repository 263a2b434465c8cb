"""Benchmarks run by hand (see BENCHMARKS.md); none of them is a test."""
