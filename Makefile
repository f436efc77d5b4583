# kaviz — set-up, notebooks and tests.  `make lab`, `make demo`, `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kaviz-installed

# Same results on every x86-64 CPU: pin the instruction set that ATen, oneDNN and MKL dispatch to,
# so the stored notebook outputs compare equal on machines with and without AVX-512.
export ATEN_CPU_CAPABILITY ?= avx2
export ONEDNN_MAX_CPU_ISA ?= AVX2
export MKL_CBWR ?= AVX2
export PYTHONHASHSEED ?= 0

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: setup lab demo test unit notebooks execute bench clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "kaviz needs Python 3.11 (found %s)" % sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --quiet -e '.[lab,dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c 'import kaviz, torch, torchvision, plotly, ipywidgets, nbval' # fail loudly if the install did not work
	@# umap compiles with numba on first import (~15 s); do it once here, not inside a notebook.
	$(PY) -c 'import warnings; warnings.simplefilter("ignore"); import umap'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kaviz)" >/dev/null
	@touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Execute every notebook headless; executed copies and HTML reports go to reports/ (the reports embed
# plotly.js so that they open offline).
demo: setup
	CI=1 KAVIZ_PLOTLY_RENDERER=plotly_mimetype+notebook $(PY) scripts/run_notebooks.py --out reports notebooks/*.ipynb

unit: setup
	CI=1 $(PY) -m pytest -q tests

notebooks: setup
	CI=1 $(PY) -m pytest -q $(NBVAL) notebooks

test: setup
	CI=1 $(PY) -m pytest -q tests
	CI=1 $(PY) -m pytest -q $(NBVAL) notebooks

# Re-execute the notebooks in place (for developers: after a change, store fresh outputs).
execute: setup
	CI=1 $(PY) scripts/run_notebooks.py --inplace $(if $(NB),$(NB),notebooks/*.ipynb)

bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_import.py
	$(PY) bench/bench_cka.py

clean:
	rm -rf reports .pytest_cache
