# Two commands do all set-up on a fresh machine:
#   make demo   runs the main job on the embedded default model
#   make test   runs the test suite (fast tests first)
# Both create or reuse the virtualenv in .venv. On a CPU-only machine torch is the local
# CPU build (torch==2.13.0); on a GPU machine install the CUDA build of 2.13.0 first.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

# One torch thread per process: the Ray tests run several model processes at once, and
# oversubscribed torch threads slowed the suite about 10x on 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" -q
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m slow -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" -q

bench: $(STAMP)
	$(BIN)/python jobs/bench.py --prompts mixed --num-sat 5 --dtype bfloat16 --max-new-tokens 128 --json results/bench.json

clean:
	rm -rf $(VENV)
