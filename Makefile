# make setup  - create .venv/ and install the package with every backend and the test tools
# make test   - the test suite (runs setup first when needed); what CI runs
# make demo   - a few-minute CPU pre-training run on scikit-learn's digits

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_system_deps.sh
	bash tools/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,dali,ffcv]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m tools.make_demo_data --out data/digits --size 32
	rm -rf runs/demo
	$(PY) -m train.pretrain --config configs/demo.yaml

clean:
	rm -rf runs/demo data/digits
