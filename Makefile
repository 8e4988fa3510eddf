# The two commands of the README: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test install

# Create the virtualenv when it is missing; (re)install the project when pyproject.toml or
# constraints.txt (the tested versions of the dependencies) changes.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "unlearnd needs Python 3.11 or later: make PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/unlearnd serve

test: install
	$(PY) -m pytest -q
