# Two entry points on a fresh machine: `make demo` (the main job on a built-in default) and `make test`.
# Both create the virtual environment and install what they need the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench mutants clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/retromae demo

# The single-process tests on both cores (pytest-xdist, one torch thread each), then the multi-process launches
# (marked slow) one at a time: each launch already uses both cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2
	$(PY) -m pytest -q -m slow

# Mutation testing (docs/mutation.md): every module, or one with MODULE=masking; about an hour on 2 cores.
mutants: $(STAMP)
	$(PY) -m pip install --quiet -e '.[mutation]'
	$(PY) scripts/mutants.py $(MODULE) --write

bench: $(STAMP)
	$(PY) scripts/bench_pretrain.py

clean:
	rm -rf $(VENV) runs
