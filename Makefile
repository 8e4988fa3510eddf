# The two commands of the README: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install

# Create the virtualenv when it is missing; (re)install the project when pyproject.toml or
# constraints.txt (the tested versions of the dependencies) changes.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/unlearnd serve

test: install
	$(PY) -m pytest -q
