# Two commands for users: `make demo` and `make test`. `make setup` only installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf runs/demo report/demo data/synthetic
