# Two entry points for a fresh machine (both idempotent):
#   make serve   set everything up, then start the server on the embedded default
#   make test    set everything up, then run lint, the type check and the test suite (what CI runs)
#   make setup EXTRA=gpu   the GPU stack instead (vLLM's CUDA build, faiss-gpu); what the GPU image runs
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
EXTRA ?= cpu

.PHONY: setup serve demo test bench quality
CORPUS := $(HOME)/.cache/sift-serve/quality-corpus

$(VENV_STAMP): pyproject.toml scripts/setup_venv.sh
	EXTRA=$(EXTRA) bash scripts/setup_venv.sh
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)
	.venv/bin/sift-serve models fetch
	.venv/bin/sift-serve index build --default

serve: setup
	.venv/bin/sift-serve serve

demo: setup
	.venv/bin/sift-serve select --index default "How do I read a CSV file and iterate over its rows?" -n 10

test: $(VENV_STAMP)
	.venv/bin/sift-serve models fetch
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -q -ra

bench: setup
	$(PY) -m benchmarks.selection_speed
	$(PY) -m benchmarks.trainer_speed
	$(PY) -m benchmarks.latency

# The quality benchmark's cpu configuration: the corpus (new-knowledge sources and a contrast cut, whole
# families), its index at 128 and 256 tokens per chunk (the recipe search tries both), the run.
quality: setup
	$(PY) -m benchmarks.corpus.build --max-mb 15 --out $(CORPUS)
	for tokens in 128 256; do \
		test -f $(CORPUS)/index-$$tokens/manifest.json || .venv/bin/sift-serve index build $(CORPUS)/train.jsonl \
			--out $(CORPUS)/index-$$tokens --chunk-tokens $$tokens || exit 1; \
	done
	$(PY) -m benchmarks.quality --config cpu --corpus $(CORPUS) --index $(CORPUS)/index-128 --index $(CORPUS)/index-256
