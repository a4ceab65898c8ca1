# Two entry points on a fresh machine: `make demo` (the main job on a built-in default) and `make test`.
# Both create the virtual environment and install what they need the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/retromae demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_pretrain.py

clean:
	rm -rf $(VENV) runs
