# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1

.PHONY: install demo test

# torch and torchvision first, pinned to the releases served from local disk here
install:
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test,larger,ray,serve]"

demo: install
	$(PYTHON) -m benchmarks.samples build/samples
	$(PYTHON) -m clipzsl.cli classify build/samples --labels demo --top-k 3

# the import-linter contracts of pyproject.toml first: a new import cycle fails before any test runs
test: install
	lint-imports
	$(PYTHON) -m pytest -q
