# kaviz — set-up, notebooks and tests.  `make lab`, `make demo`, `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kaviz-installed

# The path the stored notebook outputs are made under: pin the instruction set ATen, oneDNN and MKL
# dispatch to. This makes runs on *this* machine repeatable; other machines still differ in the last
# bits, which is why nbval compares conclusions within measured bands (docs/regression.md).
export ATEN_CPU_CAPABILITY ?= avx2
export ONEDNN_MAX_CPU_ISA ?= AVX2
export MKL_CBWR ?= AVX2
export PYTHONHASHSEED ?= 0

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

# The notebooks in the order they run (nbval and `kaviz run` keep the order given): the paper notebooks
# register the networks they train (kaviz.runs), then compare_networks.ipynb loads them by name instead
# of training them again (run alone, it trains them on demand). A notebook not listed here still runs,
# before the comparison notebook.
FIRST_NOTEBOOKS := $(addprefix notebooks/,getting_started.ipynb common_feature_learning.ipynb \
	feature_mimicking_lsh.ipynb knowledge_consistency.ipynb layerwise_amalgamation.ipynb \
	student_becoming_the_master.ipynb recombination.ipynb customize_attributes.ipynb)
LAST_NOTEBOOKS := notebooks/compare_networks.ipynb
NOTEBOOKS := $(FIRST_NOTEBOOKS) $(filter-out $(FIRST_NOTEBOOKS) $(LAST_NOTEBOOKS),$(sort $(wildcard notebooks/*.ipynb))) \
	$(LAST_NOTEBOOKS)

# The portability pass runs nbval again under a deliberately different floating-point path: AVX-512
# kernels where the CPU has them, else one thread instead of two (cache keys hold both, so teachers
# are retrained on that path, not reused).
ALT_FP ?= $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo "ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_CBWR=AVX512" || echo "KAVIZ_THREADS=1")

.PHONY: setup lab demo lint test unit notebooks portability execute bench clean browser zoo

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml or constraints.txt changed since the last install.
# pyproject.toml holds compatible ranges; constraints.txt the exact versions tested together.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "kaviz needs Python 3.11 (found %s)" % sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --quiet -e '.[lab,dev]' -c constraints.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -c 'import kaviz, torch, torchvision, plotly, ipywidgets, nbval' # fail loudly if the install did not work
	@# umap compiles with numba (~15 s on import, ~10 s on its first fit): kaviz turns numba's on-disk
	@# cache on for umap's functions, so doing it once here spares every new kernel (kaviz.embed.warm_umap)
	$(PY) -c 'import warnings; warnings.simplefilter("ignore"); from kaviz.embed import warm_umap; print(f"umap compiled and cached in {warm_umap():.0f} s")'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kaviz)" >/dev/null
	@touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Execute every notebook headless; executed copies and HTML reports go to reports/ (the reports embed
# plotly.js so that they open offline).
demo: setup
	CI=1 KAVIZ_PLOTLY_RENDERER=plotly_mimetype+notebook $(PY) -m kaviz run --out reports $(NOTEBOOKS)

# ruff (pinned in constraints.txt; configuration in pyproject.toml [tool.ruff]): zero findings.
lint: setup
	$(VENV)/bin/ruff check kaviz tests scripts bench

# Rebuild the zoo of pretrained backbones (kaviz/models/pretrained/) in the pinned environment, one
# thread per entry (scripts/build_zoo.py; ZOO_ONLY="name ..." rebuilds some entries only).
zoo: setup
	$(PY) scripts/build_zoo.py $(if $(ZOO_ONLY),--only $(ZOO_ONLY),)

unit: setup
	CI=1 $(PY) -m pytest -q tests

notebooks: setup
	CI=1 $(PY) -m pytest -q $(NBVAL) $(NOTEBOOKS)

portability: setup
	@echo "nbval under another floating-point path: $(ALT_FP)"
	CI=1 $(ALT_FP) $(PY) -m pytest -q $(NBVAL) $(NOTEBOOKS)

test: setup lint
	CI=1 $(PY) -m pytest -q -m "not realdata" tests
	@echo "every paper notebook's real-data switch on real-format fixtures (tests/test_realdata_notebooks.py)"
	CI=1 $(PY) -m pytest -q -m realdata tests
	CI=1 $(PY) -m pytest -q $(NBVAL) $(NOTEBOOKS)
	@echo "getting_started and common_feature_learning in JupyterLab, driven in headless chromium (tests/browser)"
	CI=1 KAVIZ_BROWSER_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/browser
	@echo "nbval under another floating-point path: $(ALT_FP)"
	CI=1 $(ALT_FP) $(PY) -m pytest -q $(NBVAL) $(NOTEBOOKS)

# getting_started and common_feature_learning in JupyterLab, driven by Playwright in headless Debian chromium
# (/usr/bin/chromium; Playwright never downloads a browser; .ci/run installs it with apt). Part of `make test`,
# after nbval has cached the teachers under the pinned path. Skips with the reason when chromium or
# playwright is missing. Prints the latencies; screenshots on failure: reports/browser/.
browser: setup
	CI=1 KAVIZ_BROWSER_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/browser

# Re-execute the notebooks in place (for developers: after a change, store fresh outputs).
execute: setup
	CI=1 $(PY) -m kaviz run --inplace $(if $(NB),$(NB),$(NOTEBOOKS))

bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_amp.py
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_import.py
	$(PY) bench/bench_cka.py

clean:
	rm -rf reports .pytest_cache
