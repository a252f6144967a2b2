# Two front doors: `make demo` (the main job) and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-demo bench

venv: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m facepipe demo

test: $(STAMP)
	$(PY) -m ruff check facepipe flows tests bench
	$(PY) -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(PY) -m ruff check facepipe flows tests bench
