# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Plain pip on purpose: torch 2.13.0's CPU build lies on this machine's disk, and pip finds it there first.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# Build the tiny Stable Diffusion artifact, then generate an image from it (no compile at load time).
demo: setup
	$(BIN)/diffbake build recipes/tiny-sd.toml --force
	$(BIN)/diffbake generate artifacts/tiny-sd --prompt "a photo of an astronaut riding a horse" --out artifacts/tiny-sd.png
	@echo "image written to artifacts/tiny-sd.png"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Style, and the import layers of pyproject.toml's [tool.importlinter] (cli > bench > builder > runtime > hub > format > errors).
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) artifacts/*/ .pytest_cache
