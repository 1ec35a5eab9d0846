# Two commands a newcomer needs: `make demo` and `make test`. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
.PHONY: setup test test-gpu demo bench clean

setup: $(STAMP)

# pip's notes about local index folders lacking a package are noise here; errors still fail.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	# torch first, pinned: here pip's find-links hold the CPU build; on a GPU machine
	# the same pin resolves to the CUDA build.
	$(BIN)/pip install -q torch==2.13.0 $(QUIET)
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q faiss-gpu-cu12 $(QUIET) || $(BIN)/pip install -q faiss-cpu $(QUIET)
	$(BIN)/pip install -q -e '.[kernels,dev]' $(QUIET)
else
	$(BIN)/pip install -q -e '.[cpu,kernels,dev]' $(QUIET)
endif
	touch $(STAMP)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# On a CUDA machine: the Triton kernels compiled for real (TRITON_INTERPRET=0; tests/conftest.py
# only sets the interpreter when the variable is unset), the kernel tests' CUDA cases with the
# bf16 tl.dot path, and the engine tests on CUDA (fp32, Triton backend, CUDA-graph decode).
# Not part of `make test`: CI has no GPU.
test-gpu: setup
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -q tests/llm/test_llm_kernels_decode.py \
		tests/llm/test_llm_kernels_prefill.py \
		tests/llm/test_llm_kernels_write.py tests/llm/test_llm_kernels_compile.py
	TRITON_INTERPRET=0 USERLLM_TEST_DEVICE=cuda $(BIN)/python -m pytest -q \
		tests/llm/test_llm_engine_tiny.py tests/llm/test_llm_batch_sampler.py

demo: setup
	DATA="$(DATA)" $(BIN)/python -m api.demo

bench: setup
	$(BIN)/python bench/encoder_quality.py
	$(BIN)/python bench/encoder_speed.py
	$(BIN)/python bench/store_speed.py
	$(BIN)/python bench/engine_throughput.py
	$(BIN)/python bench/kernels_decode.py
	$(BIN)/python bench/api_load.py
	$(BIN)/python bench/api_fuzz.py

clean:
	rm -rf $(VENV) .demo
