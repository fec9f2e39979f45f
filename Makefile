# Two commands set up and run everything: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test serve bench clean

install: $(STAMP)

# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The whole suite, then the Triton kernels against their references in Triton's CPU interpreter.
test: install
	$(PY) -m pytest
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm.py

# The OpenAI-compatible server on the default model, at http://127.0.0.1:8000/v1
serve: install
	$(VENV)/bin/trinity serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
