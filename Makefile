# Set-up and entry points. `make run` and `make test` work on a fresh machine: they create .venv,
# install the pinned CPU build of torch and fastnotes with its extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test bench wheel clean

# csrc/ is compiled into fastnotes._C by the (editable) install when nvcc is found: rebuild when it changes
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m fastnotes

test: setup
	$(PY) -m pytest -q

bench: setup
	mkdir -p bench/results
	$(PY) -m pytest bench -q --benchmark-json=bench/results/cpu.json
	$(PY) bench/report.py bench/results/cpu.json --out BENCHMARKS.md --plot bench/cpu.png

# dist/fastnotes-*.whl: with fastnotes._C when nvcc is found (FASTNOTES_CUDA, FASTNOTES_CUDA_ARCHS: see README)
wheel: setup
	$(PY) -m pip install --quiet build
	$(PY) -m build --wheel

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
	find . -name '*.nb[ic]' -not -path './$(VENV)/*' -delete
