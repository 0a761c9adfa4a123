# skinlesion — every target installs what it needs first (make install is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
TEST_WORKERS ?= 2
MODELS ?= resnet50,densenet121,mobilenetv2,efficientnet_b0,inception_v3

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint format train sweep evaluate report bench clean clean-cache

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with dev tools (no-op when up to date)

demo: install ## both stages on real ImageNet weights (EfficientNet-Lite0, offline) on the embedded synthetic data (CPU, a few minutes)
	$(PY) -m skinlesion.train experiment=demo $(ARGS)

test: install ## the default suite, without the tests marked slow, on TEST_WORKERS processes (what CI runs)
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-all: install ## every test, the slow end-to-end ones included
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: install ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

train: install ## train one model: make train ARGS="model=densenet121"
	$(PY) -m skinlesion.train $(ARGS)

sweep: install ## all five backbones, one recipe: make sweep ARGS="experiment=benchmark"
	$(PY) -m skinlesion.train -m model=$(MODELS) $(ARGS)

evaluate: install ## evaluate a checkpoint: make evaluate ARGS="ckpt_path=... tta=true"
	$(PY) -m skinlesion.evaluate $(ARGS)

report: install ## comparison report of a sweep folder: make report ARGS=outputs/train/multiruns/...
	$(PY) -m skinlesion.report $(ARGS)

bench: install ## data-loading and training benchmarks (figures go in BENCHMARKS.md)
	$(PY) -m skinlesion.bench all $(ARGS)

clean: ## remove run folders, caches of tools and build files (keeps .venv and data/)
	rm -rf outputs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-cache: ## remove decoded-image caches and the generated synthetic dataset
	rm -rf data/cache data/synthetic
