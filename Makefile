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

# What killed runs left (.<name>.tmp-<pid> of dead processes) goes first: a stage restored from
# DVC's cache never runs, so never reaches its own start-up cleanup.
repro: setup
	$(RUN) python -c "from stages.common.infra.atomic import clean_dead_leftovers as c; c()"
	$(RUN) dvc repro
	$(RUN) dvc metrics show metrics/eval.json

test: setup
	$(RUN) python -m pytest -q tests

test-threads: setup
	$(RUN) OMP_NUM_THREADS=1 python -m pytest -q -m training tests

# `make clean`: remove every data output of the pipeline (tests/test_atomic.py keeps the list
# equal to dvc.yaml's) and what killed runs left beside the outputs (.<name>.tmp-<pid>,
# .<name>.old-<pid>); not data/mirror, nor the git-tracked metrics and plots. `dvc checkout`
# brings the outputs back from the cache, `dvc repro` from the run cache or by running. Run it
# when no stage is running.
DATA_OUTS := data/raw data/crops data/split data/model data/train_state data/calibration \
             data/export

clean:
	rm -rf $(DATA_OUTS)
	find $(wildcard data metrics plots) -maxdepth 2 -path data/mirror -prune -o \
	  \( -name '.*.tmp-*' -o -name '.*.old-*' \) -prune -exec rm -rf {} +
