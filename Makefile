# `make test` and `make demo` each create .venv when it is absent (torch pinned first, so pip
# takes the CPU build; then the package under the exact pins of constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The default suite skips the long and multi-process tests; CI runs with PYTEST_ARGS= (everything).
PYTEST_ARGS ?= -m "not slow and not distributed"
# Two pytest-xdist workers (the multi-process tests stay on one worker, one at a time: their xdist_group): the suite
# in ~60% of the time on 2 cores. TEST_WORKERS=0 runs it in this process, one test after another. A worker that dies
# (the OOM killer) fails the run there and then (--max-worker-restart 0): a replaced worker once left a run hanging.
TEST_WORKERS ?= 2

.PHONY: test demo clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	# DeepSpeed ships as an sdist whose setup imports torch: built against the torch above (no build isolation, which
	# would fetch a CUDA torch), its C++/CUDA ops left to JIT-build on first use (DS_BUILD_OPS=0).
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev,deepspeed,wandb,eval,serve,gguf,quantize]" -c constraints.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart 0 $(PYTEST_ARGS)

# The main job on the default corpus (Python's standard library, offline): a 4-layer llama-style model trained with
# --recipe speedrun (docs/training.md) for a fixed wall-clock budget on 2 CPU cores, under 3 minutes in all; shows
# the Trainer's progress bar, prints a sample and the model folder (runs/demo). DEMO_ARGS adds or overrides flags.
DEMO_ARGS ?=
demo: $(VENV)/.installed
	$(PY) examples/train.py --preset llama \
		--config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2" \
		--tokenizer_vocab_size 4096 --max_corpus_mb 6 --block_size 128 --per_device_train_batch_size 16 \
		--recipe speedrun --max_train_seconds 140 --logging_steps 10 --max_eval_samples 64 \
		--output_dir runs/demo --overwrite_output_dir \
		$(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
