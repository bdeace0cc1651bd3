"""Benchmarks on real data (../shared/data) and real models; not part of the default test suite."""
