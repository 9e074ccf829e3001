# The two set-up commands of the README: `make demo` and `make test`. Both install into a virtual
# environment (./.venv, made here; VENV=DIR uses another) from the lock file, .ci/constraints.txt.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
LOCK := .ci/constraints.txt
EXTRAS := test,larger,ray,serve,onnx,wordnet
# TORCH_INDEX=URL: torch and torchvision from another wheel index, e.g. PyTorch's CPU-only one
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lock

install: $(VENV)/.installed

# torch and torchvision first, so that TORCH_INDEX can choose their build; the rest through the lock file
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch torchvision
	$(PIP) install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	# CLIP_benchmark's metric code, which tests/test_retrieval.py checks clipzsl against: it needs only torch and
	# tqdm, while its declared dependencies (pycocotools, webdataset...) serve data sets the tests do not load
	$(PIP) install -q --no-deps clip-benchmark==1.6.2
	touch $@

demo: install
	$(PYTHON) -m benchmarks.samples build/samples
	$(PYTHON) -m clipzsl.cli classify build/samples --labels demo --top-k 3

# the import-linter contracts and mypy (both configured in pyproject.toml) first: a new import cycle or
# type error fails before any test runs
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PYTHON) -m pytest -q

# re-resolve the lock file from pyproject.toml (the newest releases the ranges allow), for every platform
lock: install
	$(PIP) install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --quiet --no-header \
		$(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) -o $(LOCK).new
	{ printf '%s\n' $(LOCK_HEADER); cat $(LOCK).new; } > $(LOCK) && rm $(LOCK).new

comma := ,
LOCK_HEADER := "\# The lock file: every package of make install (the $(EXTRAS) extras) at the version the suite" \
	"\# last passed with. make install installs through it (pip -c); make lock re-resolves it (uv pip compile)."
