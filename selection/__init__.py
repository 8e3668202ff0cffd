"""Selection: which documents to train on for a prompt (SIFT and baselines), when to stop (the
predicted-gain rule and the paper's alpha rule), embeddings, the Faiss index (whole, or in shards merged
into one global top-K) and its typed manifest, and balanced clusters of an index (the neighbourhoods expert
adapters are trained on)."""

from selection.rules import Method
from selection.select import Selection, select, select_batch

__all__ = ["Method", "Selection", "select", "select_batch"]
