"""Quality benchmark: does test-time fine-tuning on SIFT's picks beat nearest neighbours and in-context
retrieval, and does the predicted-gain stopping rule spend steps where they pay?

    python -m benchmarks.quality --config cpu --corpus DIR --index DIR [--out benchmarks/results]

Prompts are documents of the corpus's held-out families (`benchmarks.corpus.build`; one per family):
prompt = the first P tokens, evaluation = the next E tokens, scored as bits per byte of the continuation
given the prompt (and, at the last step, of the whole P + E window). Every condition trains a fresh
adapter with the project's `Trainer` on its own picks from the same K candidates of the index over the
train side, one step per pick, scored along the way. Adaptive SIFT is the product's rule
(`SelectOptions.min_gain`); it picks a prefix of SIFT's picks, and training is deterministic and one step
per pick, so its score is SIFT's curve at its own step count (checked by training one prompt separately).
Uniform = SIFT's curve at the adaptive mean steps. Identical training inputs (same prompt, picks, learning
rate and seed) are trained once: a condition whose picks equal another's reuses that run (`same_as`).

One module per concern: `config` (the configurations), `prompts`, `records` (the typed run records and
the results file), `evaluation` (training and scoring), `protocol` (the phases, resumable), `statistics`
(calibration, costs, tests, summary), `report` (Markdown) and `plots`.
"""
