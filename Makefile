# Two commands do all the set-up on a fresh Debian machine (Python 3.11, no GPU needed):
#   make demo   the main job at a scale a CPU trains: D-TRADES against TRADES, SmallCNN on MNIST, from scratch
#   make test   the test suite
# Development: make test-isa runs the suite again with AVX2 forced, and its numerics-sensitive tests with the
# baseline instruction set (SSE4.1), so a result that holds only on one CPU's rounding shows up here.
# Both create .venv when missing and install everything first (apt packages for ffcv, pinned torch).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
export FASTROBUST_DATA ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: setup demo test test-isa bench-cpu clean

$(VENV)/.installed: pyproject.toml Makefile
	@if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then \
	  echo "installing apt packages for ffcv: $(APT_PACKAGES)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,ffcv,tensorboard,robustbench]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, triton, ffcv, pyautoattack, tensorboard, fastrobust, kernels, loaders; from fastrobust import zoo; zoo.registry()"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m recipes.mnist_dtrades_smallcnn --profile demo --compare trades --step-bench --set overwrite=True

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# the tests that train fixtures, compare code paths or check resume
NUMERICS_TESTS := tests/test_evaluation.py tests/test_methods.py tests/test_trainer.py tests/test_trainer_step.py \
	tests/test_distributed.py tests/test_kernels.py tests/test_kernels_dispatch.py tests/test_kernels_pgd.py \
	tests/test_attacks.py tests/test_attacks_precision.py tests/test_checkpoints.py tests/test_awp.py \
	tests/test_training_attack.py

test-isa: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) \
		$(NUMERICS_TESTS)

bench-cpu: setup
	$(BIN)/python -m fastrobust bench step --methods trades,dtrades --model resnet18 --batch 32 --device cpu

clean:
	rm -rf $(VENV) runs build *.egg-info
