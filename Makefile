# `make repro`: set up .venv and run the pipeline on the bundled sample (no network needed
# after the install). `make test`: set up .venv and run the test suite (CI runs exactly this).
# `make test-threads`: the tests that train, again on one CPU thread: another thread count sums
# floats in another order, as another CPU model does (CI runs it after `make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The stages' commands say `python`: put the venv's first on PATH.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro test test-threads clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $(STAMP)

repro: setup
	$(RUN) dvc repro
	$(RUN) dvc metrics show metrics/eval.json

test: setup
	$(RUN) python -m pytest -q tests

test-threads: setup
	$(RUN) OMP_NUM_THREADS=1 python -m pytest -q -m training tests

clean:
	rm -rf data/raw data/crops data/split data/model
