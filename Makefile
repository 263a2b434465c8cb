# `make repro`: set up .venv, check params.yaml (`make check`: before DVC deletes any output)
# and run the pipeline on the bundled sample (no network needed after the install).
# `make test`: set up .venv and run the test suite (CI runs exactly this).
# `make test-threads`: the tests that train, again on one CPU thread: another thread count sums
# floats in another order, as another CPU model does (CI runs it after `make test`).
# Each first checks what pip cannot install (.ci/prerequisites: git, Python 3.11 and its venv
# module; for `make test`, the libraries FiftyOne's mongod links) and stops in one line naming it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The stages' commands say `python`: put the venv's first on PATH.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: prerequisites mongod-libraries setup check repro test test-threads clean

prerequisites:
	@bash .ci/prerequisites $(PYTHON)

mongod-libraries: setup
	@bash .ci/prerequisites --mongod

setup: prerequisites $(STAMP)

$(STAMP): requirements.txt | prerequisites
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $(STAMP)

# The stages check params.yaml too, but only those that run, and after DVC deleted their outputs.
check: setup
	$(RUN) python -m stages.check

# What killed runs left (.<name>.tmp-<pid> of dead processes) goes first: a stage restored from
# DVC's cache never runs, so never reaches its own start-up cleanup.
repro: check
	$(RUN) python -c "from stages.common.infra.atomic import clean_dead_leftovers as c; c()"
	$(RUN) dvc repro
	$(RUN) dvc metrics show metrics/eval.json

test: setup mongod-libraries
	$(RUN) python -m pytest -q tests

test-threads: setup
	$(RUN) OMP_NUM_THREADS=1 python -m pytest -q -m training tests

# `make clean`: remove every data output of the pipeline (tests/test_atomic.py keeps the list
# equal to dvc.yaml's), interrupted trainings' resume states, and what killed runs left beside
# the outputs (.<name>.tmp-<pid>, .<name>.old-<pid>); not data/mirror, nor the git-tracked
# metrics and plots. `dvc checkout` brings the outputs back from the cache, `dvc repro` from the
# run cache or by running. Run it when no stage is running.
DATA_OUTS := data/raw data/crops data/split data/model data/calibration data/export
# interrupted trainings' states (no DVC output: stages/train/state.py)
RESUME_STATES := data/train_resume

clean:
	rm -rf $(DATA_OUTS) $(RESUME_STATES)
	find $(wildcard data metrics plots) -maxdepth 2 -path data/mirror -prune -o \
	  \( -name '.*.tmp-*' -o -name '.*.old-*' \) -prune -exec rm -rf {} +
