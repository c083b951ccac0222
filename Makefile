# Two commands do all the set-up on a fresh Debian machine (Python 3.11, no GPU needed):
#   make demo   the main job in a CPU-feasible form (smoke D-TRADES vs TRADES, ResNet-18, real CIFAR-10)
#   make test   the test suite
# Both create .venv when missing and install everything first (apt packages for ffcv, pinned torch).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
export FASTROBUST_DATA ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: setup demo test bench-cpu clean

$(VENV)/.installed: pyproject.toml Makefile
	@if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then \
	  echo "installing apt packages for ffcv: $(APT_PACKAGES)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,ffcv]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, triton, ffcv, pyautoattack, fastrobust, kernels, loaders"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m recipes.cifar10_dtrades_resnet18 --profile smoke --compare trades

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench-cpu: setup
	$(BIN)/python -m fastrobust bench step --methods trades,dtrades --model resnet18 --batch 32 --device cpu

clean:
	rm -rf $(VENV) runs build *.egg-info
