"""Quality benchmark: does test-time fine-tuning on SIFT's picks teach a small model what it has never seen,
better than putting the same documents in its context, and does its stopping rule spend steps where they
pay?

    python -m benchmarks.quality --config cpu --corpus DIR --index DIR/index-128 --index DIR/index-256

Prompts are documents of the corpus's held-out families (`benchmarks.corpus.build`; one per family):
new-knowledge prompts are release notes written after the base model's release, one group of prompts per
source package; contrast prompts come from older text. Prompt = the first P tokens, evaluation = the next
E tokens, scored as bits per byte of the continuation given the prompt (all of it, and its content tokens
only). Every trained condition fits a fresh adapter with the project's `Trainer` on its own picks from the
same K candidates of the index over the train side, one step per pick, scored at checkpoints. The recipe
(adapted layers, rank, tokens per step) and each method's learning rate are chosen on dev prompts; the
comparisons and their tests are fixed before the run (`statistics.PREREGISTRATION`) and clustered by
source. Identical training inputs are trained once and reused (`same_as`); each finished run is saved, so
a killed run resumes where it stopped.

One module per concern: `config` (the configurations), `prompts`, `records` (the typed run records and
the results file), `evaluation` (training and scoring), `protocol` (the phases, resumable), `statistics`
(the choices, the pre-registered tests, the summary), `report` (Markdown) and `plots`.
"""
