# Research workbench for image-based fashion recommendation. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/default.yaml
INDEX ?=
PORT ?= 8501
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: help setup data pipeline app serve test test-unit test-notebooks notebooks docs lab clean clean-cache

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(SETUP_STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

setup: $(SETUP_STAMP) ## virtual environment with the pinned packages (.venv)

data: $(SETUP_STAMP) ## find or fetch each dataset on its own: Fashion-MNIST, the clothing photos
	$(PY) -m fashionrec data

pipeline: $(SETUP_STAMP) ## run the numbered notebooks with papermill (fetches the data its PARAMS file needs)
	$(PY) -m fashionrec pipeline --params $(PARAMS)

app: $(SETUP_STAMP) ## the recommendation app in the browser: make app [INDEX=OUTDIR] [PORT=8501] (no INDEX: a default index, built once)
	$(PY) -m fashionrec app $(if $(INDEX),--index-dir "$(INDEX)") --port $(PORT)

serve: $(SETUP_STAMP) ## recommendations over HTTP: make serve INDEX=OUTDIR [PORT=8000] (write routes: FASHIONREC_API_TOKEN)
	@test -n "$(INDEX)" || { echo "make serve needs INDEX=OUTDIR (python -m fashionrec index ... --out OUTDIR)"; exit 2; }
	$(PY) -m fashionrec serve --index-dir "$(INDEX)" --port $(if $(filter file,$(origin PORT)),8000,$(PORT))

test: $(SETUP_STAMP) ## import layers, unit, integration and notebook (nbval) tests
	$(VENV)/bin/lint-imports
	$(PY) -m fashionrec data --dataset fashion-mnist
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider

test-unit: $(SETUP_STAMP) ## unit tests only (fast)
	$(PY) -m pytest tests -m "not integration" -p no:cacheprovider

test-notebooks: $(SETUP_STAMP) ## nbval over every notebook
	$(PY) -m fashionrec data --dataset fashion-mnist
	$(PY) -m pytest notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider

notebooks: $(SETUP_STAMP) ## rebuild notebooks/*.ipynb from their py:percent sources, execute, keep checked outputs
	cd notebooks && for source in [0-9][0-9]-*.py; do notebook="$${source%.py}.ipynb"; \
	  ../$(PY) -m jupytext --quiet --to ipynb "$$source" && \
	  ../$(PY) -m jupyter nbconvert --to notebook --execute --inplace "$$notebook" && \
	  ../$(PY) -c "import sys; from fashionrec.pipeline.notebooks import keep_checked_outputs; keep_checked_outputs(sys.argv[1])" "$$notebook" \
	  || exit 1; done

docs: $(SETUP_STAMP) ## regenerate docs/parameters.md from the parameter-file schema (lib/fashionrec/pipeline/params.py)
	$(PY) -m fashionrec params --markdown > docs/parameters.md

lab: $(SETUP_STAMP) ## open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

clean: ## remove derived data and run results (raw data is kept)
	rm -rf data/interim data/processed results/*/

clean-cache: ## remove only the embedding cache and the cached image-check verdicts
	rm -rf data/interim/embeddings data/interim/image-checks
