"""Benchmarks: selection speed (and later trainer, latency, quality); results as JSON under results/."""
