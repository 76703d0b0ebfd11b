# The two commands a newcomer needs: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FG     := $(BIN)/forensic-gender
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO   ?= var/demo-evidence
DEV    ?= ../shared/data/dev

.PHONY: setup models run lint test eval bench train train-wild clean

setup: $(STAMP) models

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,postgres,report,web]'
	rm -f $(VENV)/.installed-* && touch $@

models: $(STAMP)
	$(FG) models fetch

run: setup
	@mkdir -p $(DEMO) var
	@echo "Drop images (or folders of images) into $(CURDIR)/$(DEMO)."
	@echo "Query the results with: $(FG) faces --db sqlite:///var/forensic-gender.db   (Ctrl-C stops the service)"
	$(FG) run --watch $(DEMO) --db sqlite:///var/forensic-gender.db

# the rules that run (pyproject.toml: [tool.ruff], [tool.mypy]); `make test` runs them first
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q

eval: setup
	$(FG) evaluate $(DEV)/lfw $(DEV)/utkface $(DEV)/wider $(DEV)/fairface --out reports/eval --skip-missing
	$(FG) evaluate-identity $(DEV)/lfw --out reports/eval/identity.json

bench: setup
	$(BIN)/python benchmarks/bench.py

# the default gender model, models/gender-dlib-v1.onnx (~35 min on 2 shared cores); train-wild: gender-wild-v1
train: setup
	$(BIN)/python -m pip install --quiet -e '.[train]'
	$(BIN)/python -m training.features
	$(BIN)/python -m training.branch --cv desc-logistic branch-l0
	$(BIN)/python -m training.branch --final branch-l0

train-wild: setup
	$(BIN)/python -m pip install --quiet -e '.[train]'
	$(BIN)/python -m training.train

clean:
	rm -rf $(VENV) var reports build *.egg-info
