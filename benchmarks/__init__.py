"""Benchmarks: selection speed, trainer speed, serving latency, scaling of the cluster path, the soak,
quality (bits per byte, with its paired statistics in `stats` and the duplicate condition in `duplicates`)
and the corpus recipes; each prints its figures and saves them as JSON under results/."""
