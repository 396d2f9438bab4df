# The README's commands.  Each target creates .venv and installs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test unit bench scaling lint clean dashboard-screenshots

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The standard editable install; setup.cfg's package_dir says why twistd
	# finds twisted/plugins/ with it.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/taskfarm demo -n 4

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The unit layer alone: no real processes, no sockets (tests/conftest.py).
unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not process" tests

# The performance comparison (docs/performance.md): 12-15 minutes, or
# `make bench BENCH_ARGS="--quick --reps 1"` for a short check.  Other
# options: --reps N, --only taskfarm|peers, --data-mb N, --update-docs.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The controller's costs at 4, 16, 64 and 128 engines (docs/capacity.md):
# about 3 minutes and 7 GiB of memory for the engines.
scaling: $(STAMP)
	$(BIN)/python bench/scaling.py $(SCALING_ARGS)

# The dashboard's browser test (headless Chromium), keeping its screenshots
# in docs/images/ for docs/dashboard.md.  Needs Debian's chromium and
# chromium-driver (.ci/run installs them).
dashboard-screenshots: $(STAMP)
	TASKFARM_DASHBOARD_IMAGES=docs/images $(BIN)/python -m pytest -q tests/test_dashboard_browser.py

lint: $(STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check taskfarm tests bench twisted

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp*
