# Two commands on a fresh machine (Python 3.11 and pip only):
#   make book   build the whole book, executing its notebooks
#   make test   run the whole test suite
# Both create the virtual environment in .venv first if it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv book test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W --keep-going

# The unit tests and every notebook under nbval (stored outputs must match a
# fresh run); --dist loadfile keeps each notebook in one worker.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests notebooks \
	    --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

# Every benchmark in one run (~15 min on 2 cores): tables, JSON and plots in
# benchmarks/results/. `make bench BENCH_ARGS=--quick` is a smoke test of a
# few minutes that writes to a temporary folder instead.
bench: $(STAMP)
	bash benchmarks/setup_bench_env.sh
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf _build .pytest_cache
