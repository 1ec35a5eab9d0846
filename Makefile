# Two commands a newcomer needs: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
FAISS_EXTRA := faiss-gpu-cu12
else
FAISS_EXTRA := cpu
endif

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: here pip's find-links hold the CPU build; on a GPU machine
	# the same pin resolves to the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q faiss-gpu-cu12 || $(BIN)/pip install -q faiss-cpu
	$(BIN)/pip install -q -e '.[kernels,dev]'
else
	$(BIN)/pip install -q -e '.[cpu,kernels,dev]'
endif
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

demo: setup
	DATA="$(DATA)" PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

bench: setup
	$(BIN)/python bench/encoder_quality.py
	$(BIN)/python bench/encoder_speed.py

clean:
	rm -rf $(VENV) .demo
