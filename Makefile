# Two commands do all set-up on a fresh machine:
#   make run   - train the backbone and MoS on the embedded synthetic data, print metrics side by side
#   make test  - the whole test suite (Triton kernels under the CPU interpreter)
# Each creates .venv with the pinned versions (requirements/ci.txt) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): requirements/ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/ci.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m mos train --config configs/default.yaml

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q --benchmark-disable

clean:
	rm -rf $(VENV) build *.egg-info
