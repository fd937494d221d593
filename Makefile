# Distill & Deploy: every command a learner, an instructor or CI needs.
# `make lab` opens the course; `make test` runs the whole test suite. Both set up .venv first.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MOBILE_STAMP := $(VENV)/.installed-mobile
KERNEL := distill-deploy
# Where torch comes from. Empty: pip's default (this course's machines serve the CPU wheel).
# Elsewhere on Linux, PyPI's torch is a multi-GB CUDA build; for the CPU wheel use
#   make lab TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYDEVD_DISABLE_FILE_VALIDATION ?= 1

.PHONY: help install lab test lint units check-lessons check-data notebooks lessons execute experiments \
        doctor teacher teacher-answers data results-doc clean install-mobile students regimes

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' Makefile | sed -E 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# Setup prints one line per step; pip stays quiet, its whole output goes to $(PIP_LOG),
# whose end is printed only when pip fails.
PIP_LOG := $(VENV)/pip-install.log
pip_install = $(PY) -m pip install --disable-pip-version-check --progress-bar off $(1) \
	  >>$(PIP_LOG) 2>&1 || { tail -n 30 $(PIP_LOG); echo "pip failed: whole log in $(PIP_LOG)"; exit 1; }

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), \
	  f"Python 3.11 is needed, found {sys.version.split()[0]}: install 3.11 or run make PYTHON=/path/to/python3.11"'
	@echo "[1/4] creating .venv with $$($(PYTHON) --version) and upgrading pip"
	@$(PYTHON) -m venv $(VENV)
	@$(call pip_install,--upgrade pip)

# torch first, pinned and explicit: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@start=$$(date +%s); \
	if [ -e $(STAMP) ]; then echo "updating .venv: pyproject.toml changed since the last install"; fi; \
	echo "--- make install, $$(date)" >>$(PIP_LOG); \
	echo "[2/4] torch 2.13.0 from $(or $(TORCH_INDEX),pip's default index) (the largest download)"; \
	$(call pip_install,torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))); \
	echo "[3/4] the course's pinned packages from pyproject.toml (transformers, JupyterLab, ...) and dev tools"; \
	$(call pip_install,-e ".[dev]"); \
	echo "[4/4] Jupyter kernel \"Python 3 (Distill & Deploy)\" and JupyterLab settings, inside .venv"; \
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 (Distill & Deploy)" >/dev/null && \
	$(PY) -m utils.lab --write-settings >/dev/null && \
	touch $(STAMP) && \
	echo "ready: .venv installed in $$(( $$(date +%s) - start )) s (pip's output: $(PIP_LOG))"

install: $(STAMP)  ## create .venv and install the pinned stack, the Jupyter kernel and JupyterLab settings

# The optional `mobile` extra (ExecuTorch, ~200 MB): the test suite covers it too.
$(MOBILE_STAMP): $(STAMP)
	@echo "mobile extra: executorch (about 200 MB)"
	@$(call pip_install,-e ".[dev,mobile]")
	@touch $(MOBILE_STAMP)

install-mobile: $(MOBILE_STAMP)  ## add the optional mobile extra (ExecuTorch export and runtime)

lab: $(STAMP)  ## open the course: JupyterLab on lessons/ (prints the URL when headless)
	$(PY) -m utils.lab

test: $(MOBILE_STAMP)  ## the whole test suite: lint, units, drift checks, every notebook
	$(MAKE) lint
	$(MAKE) units
	$(MAKE) check-lessons
	$(MAKE) check-data
	$(MAKE) notebooks

lint: $(STAMP)  ## ruff on code and notebooks
	$(VENV)/bin/ruff check utils tests scripts solutions lessons

units: $(STAMP)  ## pytest on tests/
	$(PY) -m pytest tests -q

check-lessons: $(STAMP)  ## fail when lessons/ differs from what solutions/ generates
	$(PY) -m utils.lessons check

check-data: $(STAMP)  ## fail when committed data/ differs from its generator
	$(PY) -m utils.data check

data: $(STAMP)  ## regenerate the world's data in data/world/ and retrain its tokenizer (deterministic)
	$(PY) -m utils.data generate
	$(PY) -m utils.tokenizer build

teacher: $(STAMP)  ## build the shipped teacher into data/models/teacher/ (about 30 min), then its answers
	$(PY) scripts/build_teacher.py
	$(PY) scripts/teacher_answers.py

teacher-answers: $(STAMP)  ## the teacher's answers to every training skill prompt (lesson 03's sequence-level KD)
	$(PY) scripts/teacher_answers.py

# Results written while testing go to a temporary folder: the committed results/ come from
# `make execute` only.
notebooks: $(STAMP)  ## execute every notebook in lessons/ and solutions/ with nbval
	@tmp=$$(mktemp -d) && DD_RESULTS_DIR=$$tmp $(PY) -m pytest -q -p no:cacheprovider \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 lessons solutions; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

lessons: $(STAMP)  ## regenerate lessons/ from solutions/
	$(PY) -m utils.lessons generate

execute: $(STAMP)  ## re-execute solutions/ in place from an empty cache (outputs, first-run times, the committed results/), then lessons
	$(PY) -m utils.lessons execute --cold
	$(PY) scripts/results_doc.py

experiments: $(STAMP)  ## grids too slow for a notebook (lessons 03, 04, 07): commit results/*_grid.json
	$(PY) scripts/experiments_03.py
	$(PY) scripts/experiments_04.py
	$(PY) scripts/experiments_07.py --build-missing

students: $(STAMP)  ## shipped students (about two hours on two cores): results/03_grid_long.json, results/04_extracted_students.json, data/models/students/ (lessons 03, 04, 06, 07)
	$(PY) scripts/experiments_03.py --steps 3000 --sizes student-xs --methods sft forward_kl \
	  --out results/03_grid_long.json --ship
	$(PY) -m utils.students ship student-xs forward_kl --steps 3000 --transfer skills
	$(PY) scripts/extract_students.py

regimes: $(STAMP)  ## lesson 03's regime grid, scarce vs abundant labels x 5 seeds (about 90 min on two cores)
	$(PY) scripts/experiments_03_regimes.py

results-doc: $(STAMP)  ## regenerate docs/RESULTS.md from results/*.json
	$(PY) scripts/results_doc.py

doctor: $(STAMP)  ## workshop preflight: is this machine ready? (under 20 s)
	$(PY) -m utils.doctor

clean:  ## remove caches (keeps .venv and the shipped models)
	rm -rf .cache .pytest_cache .ruff_cache build *.egg-info
