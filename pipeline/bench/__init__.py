"""Benchmarks (`make bench`) and the committed CV comparison reports (`make reports`)."""
