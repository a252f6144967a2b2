# Two front doors: `make demo` (the main job) and `make test`. Both build .venv from requirements.lock
# when needed; `make lock` is the one way to change what the lock pins.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LOCKTOOL := $(PYTHON) tools/lockfile.py
# pytest workers for `make test` (CI has 2 cores)
TEST_WORKERS ?= 2
# pip compiles on one core; compileall (below) does the same on every core. Compiled files matter:
# where PYTHONDONTWRITEBYTECODE is set (as on CI), nothing is ever cached at import, and every process
# that imports mlflow + torch + ray recompiled them from source (~20-35 s of CPU each, measured).
PIP_INSTALL := $(PY) -m pip install --quiet --no-deps --require-hashes --no-compile
# facepipe itself, editable; this also builds the loader's C decoder (pyproject.toml, ext-modules) in place
INSTALL_SELF := $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
EXT_SRC := facepipe/data/formats/_jpeg_batch.c
EXT_STAMP := $(VENV)/.extension

.PHONY: demo test lint venv lock lock-check system-deps

venv: lock-check $(STAMP) $(EXT_STAMP)

# A new lock builds a new .venv, so nothing installed by an older lock (or by hand) survives: the
# environment is exactly the lock. torch goes first, from its own pinned, hashed line (the CPU wheel):
# an unpinned torch pulls a multi-GB CUDA build. Nothing is resolved here; pip only installs pins.
$(STAMP): $(LOCK)
	rm -rf $(VENV)
	bash infra/scripts/install-system-deps.sh build
	$(PYTHON) -m venv $(VENV)
	$(LOCKTOOL) only torch > $(VENV)/torch.lock
	$(PIP_INSTALL) -r $(VENV)/torch.lock
	$(PIP_INSTALL) -r $(LOCK)
	$(INSTALL_SELF)
	@# like pip, skip files that do not compile (templates for other Python versions); not the tests
	-$(PY) -m compileall -q -j 0 -x '/tests?/' $(VENV)/lib > /dev/null
	$(PY) -m pip check
	touch $(STAMP)

# An edited C decoder is rebuilt without rebuilding .venv (the editable install compiles it in place).
$(EXT_STAMP): $(STAMP) $(EXT_SRC)
	$(INSTALL_SELF)
	touch $@

# Fails with "run `make lock`" when pyproject.toml's dependencies changed after the lock was made.
lock-check:
	@$(LOCKTOOL) check

demo: lock-check $(STAMP) $(EXT_STAMP)
	$(PY) -m facepipe demo

# System packages some tests need (Chromium for the report's browser check), via apt-get when missing.
system-deps:
	@bash infra/scripts/install-system-deps.sh test

# Two pytest workers, whole files each (a file's fixtures, e.g. its Prefect server, start once), in
# collection order (tests/conftest.py puts files with slow tests first): the integration tests spend
# much of their time waiting on services, so the second core is otherwise idle.
test: lock-check $(STAMP) $(EXT_STAMP) system-deps
	$(PY) -m ruff check facepipe flows tests bench tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 tests

lint: lock-check $(STAMP) $(EXT_STAMP)
	$(PY) -m ruff check facepipe flows tests bench tools

# Re-resolve pyproject.toml's ranges into exact pins with hashes (keeping current pins where they still
# fit; `make lock UPGRADE=1` takes the newest), then point the images and manifests at the new versions.
lock:
	test -x $(PY) || $(MAKE) $(STAMP)
	CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile --quiet --generate-hashes --allow-unsafe \
		--strip-extras --extra dev --extra cluster --no-emit-index-url --no-emit-find-links \
		--no-emit-trusted-host $(if $(UPGRADE),--upgrade) -o $(LOCK) pyproject.toml
	$(LOCKTOOL) stamp
	$(LOCKTOOL) sync-versions
	@echo "requirements.lock updated; the next make test/demo rebuilds .venv from it"
