# `make demo` and `make test` each create .venv when missing and install the package into it
# once (a stamp file remembers; editing pyproject.toml reinstalls). `make test` also installs the
# PyTorch reference tools of the `reference` tests: CPU torch, and torchattacks without its stale
# pins (it declares torchvision and requests~=2.25, which its attacks do not need).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REFERENCE_STAMP := $(VENV)/.installed-reference
WORKDIR ?= workdir/quickstart

.PHONY: install demo evaluate test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(REFERENCE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1 scipy tqdm requests
	touch $(REFERENCE_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m rcnas_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

# The evaluation suite (APGD-CE, APGD-T, FAB-T, Square, standard AutoAttack, gradient-masking
# checks) on the demo's exported student.
evaluate: $(STAMP)
	$(PY) -m rcnas_jax.main --config=configs/quickstart.py --config.mode=evaluate \
	    --config.checkpoint=$(WORKDIR)/export --workdir=$(WORKDIR)/evaluation

test: $(REFERENCE_STAMP)
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) workdir .cache .pytest_cache
