# Two commands do all set-up on a fresh machine:
#   make run   - the FLOPs-versus-accuracy profile on the embedded synthetic data, default and long
#                histories (MoS, ablations, baselines)
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
	$(PY) -m mos_kernels.cuda_ops
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m mos profile --config configs/profile.yaml
	$(PY) -m mos profile --config configs/profile_long.yaml

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q --benchmark-disable

clean:
	rm -rf $(VENV) build *.egg-info
