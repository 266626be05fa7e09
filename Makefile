# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use, install the known-good CPU recipe plus this project, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mambalab-installed
ARCH := $(shell uname -m)
# torch/torchvision pairs known to install and run on CPU here (x86_64 wheels come from local disk).
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Extras installed into .venv: tests cover the sweep launchers, dense and medical tasks too.
EXTRAS ?= dev,sweep,dense,medical,mamba-cpu
# mamba-ssm's Python code without its CUDA build, unless a mamba-ssm is installed already (a CUDA machine's
# real one stays): the tests run its SelectiveScanFn on CPU with a stand-in for the compiled extension.
# MAMBA_FORCE_BUILD stops its setup.py from trying to download a prebuilt CUDA wheel from GitHub.
MAMBA_SSM := mamba-ssm==2.3.1
# The demos read the real data files these packages ship; their own dependencies (TensorFlow, rasterio, ...)
# are not needed for that, so they are installed without them.
DATA_PACKAGES := stardist==0.9.2 deepforest==2.1.0
# A prebuilt CPU mmcv 2.1.0 for CPython 3.11 / x86_64 / torch 2.14.1 (see docs/mm/README.md to build one).
MMCV_WHEEL := $(wildcard ../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl)

.PHONY: install mm demo test test-slow test-all test-timm lint clean

KERNEL := backbones/_kernels/manifest.json

install: $(STAMP) $(KERNEL)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' $(TORCH_PINS)
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	$(PY) -m pip show -q mamba-ssm >/dev/null 2>&1 || MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
		$(PY) -m pip install -q --no-deps --no-build-isolation $(MAMBA_SSM)
	touch $(STAMP)

# The fused CPU kernels (selective scan, Vim's causal conv, HRVMamba's DCNv4), where a C++ compiler exists (without one the
# pure-PyTorch scan runs; `python -m tools.doctor` says which). Rebuilt when their sources change.
$(KERNEL): backbones/csrc/selective_scan.cpp backbones/csrc/causal_conv.cpp backbones/csrc/dcnv4.cpp $(STAMP)
	$(PY) -m backbones.kernel build --skip-without-compiler

# Optional OpenMMLab stack (mmdet/mmseg integration): the prebuilt mmcv wheel where it exists.
mm: $(STAMP)
ifeq ($(MMCV_WHEEL),)
	@echo "no prebuilt mmcv wheel for this machine: build mmcv 2.1.0 from source as docs/mm/README.md shows"; exit 1
else
	$(PY) -m pip install -q "setuptools<81" $(MMCV_WHEEL) $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[$(EXTRAS),mm]' $(TORCH_PINS)
endif

# Fashion-MNIST ships in Debian's dataset-fashion-mnist; install it where apt exists and we may.
$(FASHION_MNIST):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST: no apt-get as root here; run.py will look in data/ or use torchvision's downloader"; \
	fi

demo: install $(FASHION_MNIST)
	$(PY) run.py

test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest

# timm's own tests/test_models.py (fetched from the installed timm's sdist) on every registered backbone.
test-timm: install
	$(PY) -m tools.timm_suite

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) logs .pytest_cache .cache/timm-suite backbones/_kernels
