# make setup  - create .venv/ and install the package with every backend and the test tools
# make test   - the test suite (runs setup first when needed); what CI runs
# make demo   - a few-minute CPU pre-training run on scikit-learn's digits; needs only the core
#               install (torch backend: no DALI, no FFCV build, no system packages)
# make wheelhouse PY=3.12 OUT=wheelhouse/  - on a connected machine: every wheel the project needs
#               but torch/torchvision, for an offline install (README, "GPU nodes without internet")
# make lock   - rewrite requirements/*.txt from the environment (after changing dependencies);
#               LOCK_REPORTS="a.json ..." adds what pip --report files resolved beyond it
#
# Variables:
#   VENV=DIR        the environment to install into (default .venv, created when missing; an
#                   existing one, e.g. VENV=$$CONDA_PREFIX, is used as it is)
#   SYSTEM_SITE=1   create the venv with --system-site-packages, so that it sees a preinstalled torch
#   WHEELHOUSE=DIR  install with no index, from a folder made by `make wheelhouse`
#   CONSTRAINTS=    (empty) resolve by setup.cfg's ranges alone, keeping what is already installed
#                   where it fits, instead of the tested versions in requirements/constraints.txt
# torch/torchvision already installed (within setup.cfg's range) are kept; requirements/torch.txt is
# installed only where there is no torch.

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
SYSTEM_SITE ?= 0
WHEELHOUSE ?=
CONSTRAINTS ?= requirements/constraints.txt
EXTRAS ?= dev,dali-cu12,ffcv
PIP_SOURCE := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
CORE_STAMP := $(VENV)/.suncet-core
FULL_STAMP := $(VENV)/.suncet-full
# make wheelhouse
PY ?= 3.12
OUT ?= wheelhouse/

.PHONY: setup setup-core test demo wheelhouse lock clean

setup: $(FULL_STAMP)
setup-core: $(CORE_STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages) $(VENV)

# Core: torch (unless one is installed) + the package with its pure dependencies.
$(CORE_STAMP): setup.cfg pyproject.toml requirements/constraints.txt requirements/torch.txt | $(VENV_PY)
	@if $(VENV_PY) -m pip show torch >/dev/null 2>&1; then \
	  echo "torch $$($(VENV_PY) -m pip show torch | sed -n 's/^Version: //p') is installed: kept if setup.cfg's range admits it"; \
	else \
	  $(VENV_PY) -m pip install $(PIP_SOURCE) $(PIP_CONSTRAINTS) -r requirements/torch.txt || \
	  { echo "error: no torch installed and none could be installed$(if $(WHEELHOUSE), (wheelhouses hold no torch: install your torch build first))" >&2; exit 1; }; \
	fi
	$(VENV_PY) -m pip install $(PIP_SOURCE) $(PIP_CONSTRAINTS) -e .
	touch $@

# Full: every backend and the test tools. FFCV from an index is a source build that needs system
# headers; from a wheelhouse it is a prebuilt wheel with its libraries bundled.
$(FULL_STAMP): $(CORE_STAMP) tools/install_system_deps.sh
	$(if $(WHEELHOUSE),,bash tools/install_system_deps.sh)
	$(VENV_PY) -m pip install $(PIP_SOURCE) $(PIP_CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

test: setup
	$(VENV_PY) -m pytest -q

demo: setup-core
	$(VENV_PY) -m tools.make_demo_data --out data/digits --size 32
	rm -rf runs/demo
	$(VENV_PY) -m train.pretrain --config configs/demo.yaml

wheelhouse:
	bash tools/build_wheelhouse.sh --python $(PY) --out $(OUT)

lock: setup
	$(VENV_PY) -m tools.deps lock --out requirements $(addprefix --report ,$(LOCK_REPORTS))

clean:
	rm -rf runs/demo data/digits
