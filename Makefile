# Two entry points do all set-up on a fresh machine (Python 3.11 + make):
#   make demo   the main job on the embedded tiny default
#   make test   the test suite (full-size `slow` tests excluded)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TINY := artifacts/tiny

.PHONY: demo test test-all lint bench clean

$(BIN)/anechain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/anechain
	$(BIN)/anechain random-checkpoint $(TINY)/checkpoint --preset tiny --overwrite
	$(BIN)/anechain export --model $(TINY)/checkpoint --config configs/tiny.yaml --overwrite \
		--layer-spec 0:3:$(TINY)/layers_0_3.mlpackage \
		--layer-spec 3:5:$(TINY)/layers_3_5.mlpackage \
		--layer-spec 5:6:$(TINY)/layers_5_6.mlpackage

test: $(BIN)/anechain
	$(BIN)/python -m pytest

test-all: $(BIN)/anechain
	$(BIN)/python -m pytest -m ''

lint: $(BIN)/anechain
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) $(TINY)
