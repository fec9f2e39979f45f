# Two commands set up and run everything: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast serve bench clean

install: $(STAMP)

# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,frameworks]"
	@touch $(STAMP)

# The whole suite, then the Triton kernels against their references in Triton's CPU interpreter.
test: install
	$(PY) -m pytest
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm.py \
		tests/test_kernels_embed.py tests/test_kernels_linear_norm.py tests/test_last_program.py tests/test_launch_count.py \
		tests/test_decode_table.py tests/test_kernels_fp8_triton.py tests/test_kernels_int4_triton.py

# The inner loop: everything but the tests marked slow, server (a `trinity serve` subprocess) or gpu; stops at the
# first failure. The markers are registered in tests/conftest.py.
test-fast: install
	$(PY) -m pytest -x -m "not slow and not server and not gpu"

# The OpenAI-compatible server on the default (built-in) model, at http://127.0.0.1:8000/v1, with reasoning
# split out and tool calls on (the Hermes parser), so every feature shows with no download.
SERVE_ARGS ?= --enable-auto-tool-choice
serve: install
	$(VENV)/bin/trinity serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# The built-in tiny model from scratch (issues 7 and 24): synthetic corpus -> BPE tokenizer -> `trinity train` with
# configs/tiny_model.toml (supervised) -> GRPO with configs/tiny_grpo.toml, then configs/tiny_grpo_json.toml -> the
# last export copied into the package.
# Everything under out/tiny is rebuilt. TINY_TRAIN_ARGS / TINY_GRPO_ARGS pass overrides to either stage, e.g.
# TINY_TRAIN_ARGS="--steps 30" TINY_GRPO_ARGS="--steps 2" for a smoke run.
TINY        := out/tiny
TINY_ASSETS := src/trinity/assets/trinity-tiny
TINY_CORPUS := --train 60000 --heldout 300 --seed 0
# GRPO's tasks: the training families only (no held-out tool domain), their own seed; the families the supervised
# model already gets right every time (tool_use, JSON) are left out: their groups would carry no gradient
# (rest=0: the families not named get weight 0; without it --heldout-mix would keep the unseen-tool families)
TINY_RL     := --train 0 --heldout 1600 --seed 7 --heldout-mix arithmetic=0.2,arithmetic_chain=0.05,gen_tool_call=0.3,gen_tool_none=0.1,gen_tool_parallel=0.1,tool_choice_forced=0.25,rest=0
# the second RL stage's extra tasks: arithmetic under a JSON schema, the bare question as a client sends it (the corpus
# holds only the form whose prompt asks for JSON: arithmetic_json_asked)
TINY_RL_JSON := --train 0 --heldout 400 --seed 99 --heldout-mix arithmetic_json=1,rest=0
# glibc returns large freed blocks to the OS, so every big activation buffer page-faults anew on first touch:
# keeping them in the heap measured ~15% more training tokens/s on 2 cores.
TINY_MALLOC := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
# GRPO's tensors change size every round (rollout lengths): kept in the heap they fragmented it, and its RSS grew
# ~0.25 GB per step (15 GB by step 30); mapped and returned on free it was 2.6 GB at step 27 of 40.
GRPO_MALLOC := MALLOC_MMAP_THRESHOLD_=65536
.PHONY: tiny-model tiny-eval

tiny-model: install
	rm -rf $(TINY)
	$(PY) -m trinity.synthetic --out $(TINY)/data $(TINY_CORPUS)
	$(PY) -m trinity.synthetic tokenizer --corpus $(TINY)/data --vocab 2560 --out $(TINY)/tokenizer
	$(TINY_MALLOC) $(VENV)/bin/trinity train --config configs/tiny_model.toml $(TINY_TRAIN_ARGS)
	$(PY) -m trinity.synthetic --out $(TINY)/rl $(TINY_RL)
	$(GRPO_MALLOC) $(VENV)/bin/trinity train --config configs/tiny_grpo.toml $(TINY_GRPO_ARGS)
	$(PY) -m trinity.synthetic --out $(TINY)/rl_json $(TINY_RL_JSON)
	cat $(TINY)/rl/heldout.jsonl $(TINY)/rl_json/heldout.jsonl > $(TINY)/rl_json/tasks.jsonl
	$(GRPO_MALLOC) $(VENV)/bin/trinity train --config configs/tiny_grpo_json.toml $(TINY_GRPO_ARGS)
	rm -rf $(TINY_ASSETS) && mkdir -p $(TINY_ASSETS)
	cp $(TINY)/grpo_json/export/* $(TINY_ASSETS)/
	cp $(TINY)/tokenizer/* $(TINY_ASSETS)/  # the same tokenizer, with the chat template in tokenizer_config.json
	cp configs/tiny_model_card.md $(TINY_ASSETS)/README.md

# The issue's evaluation of the shipped model on the 300 held-out tasks, through the real server.
tiny-eval: install
	@test -f $(TINY)/data/heldout.jsonl || $(PY) -m trinity.synthetic --out $(TINY)/data $(TINY_CORPUS)
	$(PY) benchmarks/tiny_eval.py --model $(TINY_ASSETS) --heldout $(TINY)/data/heldout.jsonl

# The GPU kernels against the lent device's Triton (3.6, older than ours), without a GPU: a second venv with that
# Triton runs the kernels' interpreter tests and the sm_90 compile checks (registers, spills, barrier order).
# numpy < 2.3: Triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses.
DEVICE_VENV   := .venv-device-triton
DEVICE_TRITON := triton==3.6.0
.PHONY: device-compat

device-compat:
	@test -x $(DEVICE_VENV)/bin/python || $(PYTHON) -m venv $(DEVICE_VENV) || python3 -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q torch==2.13.0 $(DEVICE_TRITON) "numpy<2.3" pytest safetensors
	TRINITY_COMPILE_CHECK=1 TRINITY_KERNEL_AOT=1 PYTHONPATH=src:tests $(DEVICE_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm.py tests/test_kernels_embed.py \
		tests/test_kernels_linear_norm.py tests/test_last_program.py tests/test_pdl.py tests/test_kernels_fp8_triton.py \
		tests/test_kernels_int4_triton.py -k "compile or barrier or wait"
	TRITON_INTERPRET=1 PYTHONPATH=src:tests $(DEVICE_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm.py tests/test_kernels_embed.py \
		tests/test_kernels_linear_norm.py tests/test_last_program.py tests/test_launch_count.py tests/test_decode_table.py \
		tests/test_kernels_fp8_triton.py tests/test_kernels_int4_triton.py
