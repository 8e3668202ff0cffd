"""Balanced clusters of an index's embeddings (the neighbourhoods that merging's experts are trained on),
and each cluster's key: its normalised mean embedding.

Balanced bisecting k-means: start from one cluster holding every row; while there are fewer than k, split
the largest in two. A split runs 2-means (Faiss) on the cluster's rows and cuts at the median of
d(x, c_1) - d(x, c_2), so the two halves differ by at most one row: every cluster ends up with between
n / 2k and 2n / k rows, and none is empty.
"""

from __future__ import annotations

import faiss
import numpy as np


def balanced_clusters(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A cluster label in [0, k) for each of the (n, d) rows (clusters numbered by first split order)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} rows")
    labels = np.zeros(n, dtype=np.int64)
    for new in range(1, k):
        largest = int(np.bincount(labels, minlength=new).argmax())
        rows = np.flatnonzero(labels == largest)
        labels[_upper_half(x[rows], seed + new, rows)] = new
    return labels


def _upper_half(points: np.ndarray, seed: int, rows: np.ndarray) -> np.ndarray:
    """The rows of the half of `points` nearer the second of two 2-means centroids (cut at the median)."""
    if len(points) < 2:
        raise ValueError("a cluster of one row cannot be split")
    kmeans = faiss.Kmeans(points.shape[1], 2, niter=20, seed=seed, min_points_per_centroid=1, verbose=False)
    kmeans.train(points)
    d1 = ((points - kmeans.centroids[0]) ** 2).sum(1)
    d2 = ((points - kmeans.centroids[1]) ** 2).sum(1)
    order = np.argsort(d1 - d2, kind="stable")  # most clearly nearer c_1 first
    return rows[order[len(points) // 2 :]]


def cluster_keys(embeddings: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) unit vectors: each cluster's mean embedding, normalised."""
    x = np.asarray(embeddings, dtype=np.float64)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a cluster is empty or its embeddings cancel out")
    return (sums / norms).astype(np.float32)
