"""Recipes for the quality benchmark's multi-domain corpus, built from pinned registry packages."""
