# Two commands do all set-up on a fresh machine:
#   make run     - the main job: MoS against its backbone, the stacking control and three MoE
#                  baselines on the embedded synthetic data, five seeds, paired statistics
#                  (22-24 minutes on 2 idle cores, measured twice from a fresh clone)
#   make test    - the whole test suite (Triton kernels under the CPU interpreter)
# Each creates .venv with the pinned versions (requirements/ci.txt) when it is missing.
#   make profile - the full study: each model's options chosen on a validation grid, on the
#                  default and the long synthetic settings and on MovieLens-100k (30 and 200
#                  events); resumable, about 5 hours (docs/profile.md)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

JOBS ?= 2

.PHONY: run profile test venv clean

venv: $(STAMP)

# torch first, as tools/torch_wheel.py chooses: the CPU build wherever there is no CUDA (PyPI's
# Linux wheel is the CUDA one); requirements/ci.txt then finds its pin already satisfied.
$(STAMP): requirements/ci.txt pyproject.toml tools/torch_wheel.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $$($(PY) tools/torch_wheel.py --explain)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/ci.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) -m mos_kernels.cuda_ops
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m mos profile --config configs/profile.yaml --no-tuning --jobs $(JOBS)

STUDY_MODELS := models=[backbone,stacked_backbone,gshard,dselect_k,expert_choice,mos,mos_random_routing]

profile: $(STAMP)
	$(PY) -m mos profile --config configs/profile.yaml --jobs $(JOBS) --set "$(STUDY_MODELS)"
	$(PY) -m mos profile --config configs/profile_long.yaml --jobs $(JOBS) --set "$(STUDY_MODELS)"
	$(PY) -m mos profile --config configs/profile_movielens.yaml --jobs $(JOBS)
	$(PY) -m mos profile --config configs/profile_movielens.yaml --jobs $(JOBS) \
		--set data.max_history=200 train.out_dir=runs/profile_movielens_200 \
		"profile.setting=MovieLens-100k, newest 200 ratings"

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q --benchmark-disable

clean:
	rm -rf $(VENV) build *.egg-info
