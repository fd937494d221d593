# Distill & Deploy: every command a learner, an instructor or CI needs.
# `make lab` opens the course; `make test` runs the whole test suite. Both set up .venv first.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MOBILE_STAMP := $(VENV)/.installed-mobile
BROWSER_STAMP := $(VENV)/.installed-browser
KERNEL := distill-deploy
# Where torch comes from. Empty: pip's default (this course's machines serve the CPU wheel).
# Elsewhere on Linux, PyPI's torch is a multi-GB CUDA build; for the CPU wheel use
#   make lab TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYDEVD_DISABLE_FILE_VALIDATION ?= 1

.PHONY: help install lab test lint units check-lessons check-data notebooks lessons execute experiments frontier multi-answer \
        doctor teacher teacher-answers data results-doc clean install-mobile students regimes \
        browser browser-test

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
# (a variable: a comma inside $(call ...) would split the argument)
MOBILE_SPEC := ".[dev,mobile]"
$(MOBILE_STAMP): $(STAMP)
	@echo "mobile extra: executorch (about 200 MB)"
	@$(call pip_install,-e $(MOBILE_SPEC))
	@touch $(MOBILE_STAMP)

install-mobile: $(MOBILE_STAMP)  ## add the optional mobile extra (ExecuTorch export and runtime)

# The browser test (tests/test_browser.py) drives Debian's chromium with Playwright for Python:
# the optional `browser` extra (Playwright's driver, no browser) from PyPI, and chromium from
# apt. `playwright install` (Playwright's own browser download) is never used.
BROWSER_SPEC := ".[dev,browser]"
$(BROWSER_STAMP): $(STAMP)
	@echo "browser extra: Playwright for Python (the browser itself is Debian's chromium)"
	@$(call pip_install,-e $(BROWSER_SPEC))
	@touch $(BROWSER_STAMP)

browser: $(BROWSER_STAMP)  ## the browser test's tools: Playwright (pip) and Debian's chromium (apt, as root or with sudo)
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium is missing and there is no apt-get: install Chromium, then run the test with DD_CHROMIUM=/path/to/chromium"; exit 1; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "chromium is missing; install it with: sudo apt-get install -y chromium"; exit 1; fi; \
	  echo "chromium: apt-get install -y chromium (Debian's package)"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null 2>&1 || \
	  { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null; } || \
	  { echo "apt-get install -y chromium failed"; exit 1; }; \
	  echo "chromium: $$(command -v chromium)"; \
	fi

browser-test: $(BROWSER_STAMP)  ## lessons 01 and 02 in a real browser (Debian's chromium); skips, saying why, without it (make browser)
	$(PY) -m pytest tests/test_browser.py -q -p no:cacheprovider

lab: $(STAMP)  ## open the course: JupyterLab on lessons/ (prints the URL when headless)
	$(PY) -m utils.lab

test: $(MOBILE_STAMP) $(BROWSER_STAMP)  ## the whole test suite: lint, units, drift checks, every notebook, the browser test
	$(MAKE) lint
	$(MAKE) units
	$(MAKE) check-lessons
	$(MAKE) check-data
	$(MAKE) notebooks
	$(MAKE) browser-test

lint: $(STAMP)  ## ruff on code and notebooks
	$(VENV)/bin/ruff check utils tests scripts solutions lessons

# UNIT_WORKERS test files run at once (pytest-xdist; --dist loadfile keeps a file's tests and
# its module fixtures on one worker; the model cache's lock makes a second worker wait for a
# model the first is building; PASSIVE: see NB_WORKERS below). UNIT_WORKERS=0: one at a time.
UNIT_WORKERS ?= 2
units: $(STAMP)  ## pytest on tests/ (without the browser test: make browser-test), UNIT_WORKERS files at a time
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests -q -m "not browser" -n $(UNIT_WORKERS) --dist loadfile

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
# `make execute` only. NB_WORKERS notebooks run at once (pytest-xdist; --dist loadscope keeps a
# notebook's cells in order on one kernel; the model cache's lock makes a second kernel wait for
# a model the first is building). OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of
# spinning, so two kernels on two cores do not slow each other down (NB_WORKERS=0: one at a time).
NB_WORKERS ?= 2
notebooks: $(STAMP)  ## execute every notebook in lessons/ and solutions/ with nbval (NB_WORKERS at a time)
	@tmp=$$(mktemp -d) && DD_RESULTS_DIR=$$tmp OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q \
	  -p no:cacheprovider -n $(NB_WORKERS) --dist loadscope \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 lessons solutions; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

lessons: $(STAMP)  ## regenerate lessons/ from solutions/
	$(PY) -m utils.lessons generate

execute: $(STAMP)  ## re-execute solutions/ in place from an empty cache (outputs, first-run times, the committed results/), then lessons
	$(PY) -m utils.lessons execute --cold
	$(PY) scripts/results_doc.py
	$(PY) -m utils.grade --instructors-doc --write

experiments: $(STAMP)  ## grids too slow for a notebook (lessons 03, 04, 07): commit results/*_grid.json
	$(PY) scripts/experiments_03.py
	$(PY) scripts/experiments_04.py
	$(PY) scripts/experiments_04_radioactivity.py
	$(PY) scripts/experiments_04_noise_price.py
	$(PY) scripts/experiments_07.py --build-missing
	$(PY) scripts/experiments_07_erosion.py
	$(PY) scripts/experiments_07_adaptive.py

students: $(STAMP)  ## shipped students (about two hours on two cores): results/03_grid_long.json, results/04_extracted_students.json, data/models/students/ (lessons 03, 04, 06, 07)
	$(PY) scripts/experiments_03.py --steps 3000 --sizes student-xs --methods sft forward_kl \
	  --out results/03_grid_long.json --ship
	$(PY) -m utils.students ship student-xs forward_kl --steps 3000 --transfer skills
	$(PY) scripts/extract_students.py

frontier: $(STAMP)  ## lesson 03's frontier over student sizes at the long budget (student-xxs, student-s; sft and forward_kl, 2 seeds; about 45 min on two cores)
	$(PY) scripts/experiments_03.py --steps 3000 --sizes student-xxs student-s \
	  --methods sft forward_kl --seeds 0 1 --out results/03_frontier_long.json

multi-answer: $(STAMP)  ## lesson 03's any-letter skill: its teacher (about 4 min, once, committed to data/models/teacher-any-letter/) and the 35-run grid (about 7 min)
	$(PY) scripts/experiments_03_multi_answer.py

regimes: $(STAMP)  ## lesson 03's regime grid, scarce vs abundant labels x 5 seeds (about 90 min on two cores)
	$(PY) scripts/experiments_03_regimes.py

.PHONY: scaling
scaling: $(STAMP)  ## lesson 06's decode speed vs model size (2M-227M, fp32/int8/4-bit, about 45 min) -> results/06_scaling.json, docs/BENCHMARKS.md
	$(PY) scripts/bench_scaling.py

.PHONY: erosion adaptive-attack
erosion: $(STAMP)  ## lesson 07's erosion run (Qi et al. 2023): benign fine-tuning of the safety-aware student -> results/07_erosion.json
	$(PY) scripts/experiments_07_erosion.py

adaptive-attack: $(STAMP)  ## lesson 07's adaptive attack (random-search suffix) on the teacher and students -> results/07_adaptive.json
	$(PY) scripts/experiments_07_adaptive.py

results-doc: $(STAMP)  ## regenerate docs/RESULTS.md from results/*.json
	$(PY) scripts/results_doc.py

doctor: $(STAMP)  ## workshop preflight: is this machine ready? (under 20 s)
	$(PY) -m utils.doctor

# --- instructor's kit (docs/INSTRUCTORS.md) ---------------------------------------------------
.PHONY: wheelhouse xstest grade

# Every wheel of the pinned stack for a room without internet: the pins of pyproject.toml with
# the extras in WHEELHOUSE_EXTRAS (or WHEELHOUSE_REQS instead), their dependencies, pip and the
# build backend (for the editable install). Wheels fit this OS and CPU, and every Python from
# WHEELHOUSE_PYTHON (the oldest that requires-python allows) up to the one building them.
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_EXTRAS ?= dev,mobile
WHEELHOUSE_REQS ?= $(shell $(PYTHON) -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; x = [e for e in sys.argv[1].split(",") if e]; print(" ".join(p["dependencies"] + [d for e in x for d in p["optional-dependencies"][e]]))' '$(WHEELHOUSE_EXTRAS)')
WHEELHOUSE_TOOLS = pip $(shell $(PYTHON) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
WHEELHOUSE_PYTHON ?= $(shell $(PYTHON) -c 'import re, tomllib; print(re.search(r">=\s*([0-9.]+)", tomllib.load(open("pyproject.toml", "rb"))["project"]["requires-python"]).group(1))')
WHEELHOUSE_LOG = $(WHEELHOUSE)/pip.log
wheelhouse_args = $(foreach r,$(WHEELHOUSE_REQS) $(WHEELHOUSE_TOOLS),'$(r)')  # quoted: ">=" is no redirect
wheelhouse_pip = $(PY) -m pip $(1) >>$(WHEELHOUSE_LOG) 2>&1 || { tail -n 30 $(WHEELHOUSE_LOG); \
	  echo "pip failed: whole log in $(WHEELHOUSE_LOG)"; exit 1; }

wheelhouse: | $(PY)  ## every wheel of the pinned stack in wheelhouse/, to install with --no-index where there is no internet
	@mkdir -p $(WHEELHOUSE) && echo "--- make wheelhouse, $$(date)" >>$(WHEELHOUSE_LOG)
	@echo "[1/4] wheels of $(words $(wheelhouse_args)) requirements and their dependencies into $(WHEELHOUSE)/ (torch is the largest)"
	@$(call wheelhouse_pip,wheel --progress-bar off -w $(WHEELHOUSE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(wheelhouse_args))
	@echo "[2/4] the wheels Python $(WHEELHOUSE_PYTHON) needs where newer releases dropped it"
	@$(call wheelhouse_pip,download --progress-bar off --python-version $(WHEELHOUSE_PYTHON) --only-binary=:all: --find-links $(WHEELHOUSE) -d $(WHEELHOUSE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(wheelhouse_args))
	@echo "[3/4] resolving everything again from $(WHEELHOUSE)/ alone (--no-index) for Python $(WHEELHOUSE_PYTHON), as an offline machine will"
	@$(call wheelhouse_pip,install --dry-run --ignore-installed --no-index --find-links $(WHEELHOUSE) --python-version $(WHEELHOUSE_PYTHON) --only-binary=:all: --report $(WHEELHOUSE)/report.json $(wheelhouse_args))
	@echo "[4/4] $(WHEELHOUSE)/requirements.txt: the exact versions"
	@$(PY) -c 'import json, sys; r = json.load(open(sys.argv[1])); pins = sorted(i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in r["install"]); open(sys.argv[2], "w").write("# make wheelhouse; offline: pip install --no-index --find-links DIR -r DIR/requirements.txt\n" + "\n".join(pins) + "\n")' $(WHEELHOUSE)/report.json $(WHEELHOUSE)/requirements.txt
	@echo "ready: $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1) in $(WHEELHOUSE)/. On the offline machine (same OS and CPU, Python 3.11):"
	@echo "  python3.11 -m venv .venv && PIP_NO_INDEX=1 PIP_FIND_LINKS=$(abspath $(WHEELHOUSE)) make install"

xstest: $(STAMP)  ## fetch XSTest (prompts + 5 human-labelled completion sets, pinned, sha256-checked) into the course cache for lesson 07
	$(PY) -m utils.xstest fetch

# make grade SUBMISSIONS=folder-with-one-folder-per-learner [GRADES=grades.csv]
SUBMISSIONS ?= submissions
GRADES ?= grades.csv
grade: $(STAMP)  ## run learners' notebooks (SUBMISSIONS=folder, one sub-folder per learner) and write GRADES=grades.csv
	$(PY) -m utils.grade $(SUBMISSIONS) --out $(GRADES)

# make leaderboard CARDS=folder-of-card-json [BOARD=leaderboard]  (lesson 08's capstone cards)
.PHONY: leaderboard
CARDS ?= cards
BOARD ?= leaderboard
leaderboard: $(STAMP)  ## rank participants' capstone cards (CARDS=folder of card JSONs) into BOARD/leaderboard.md and .csv
	$(PY) -m utils.leaderboard $(CARDS) --out $(BOARD)

clean:  ## remove caches (keeps .venv and the shipped models)
	rm -rf .cache .pytest_cache .ruff_cache build *.egg-info
