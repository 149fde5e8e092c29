# The two commands of the README (and `make quick`, `make lint`). Each installs the project into .venv on first use
# (cluster/env/install.sh; versions from cluster/env/constraints.txt) and skips the
# install afterwards until one of the install inputs changes.
VENV ?= .venv
PYTEST_ARGS ?=
INSTALL_INPUTS := pyproject.toml cluster/env/install.sh cluster/env/constraints.txt cluster/env/torchvision_compat.py

.PHONY: demo test quick lint install clean

demo: $(VENV)/.installed
	$(VENV)/bin/unilip demo

# Two test processes (pytest-xdist): the stack's tests in one, in order (tests/conftest.py),
# the others beside them, on the CPU the stack's tests leave idle.
test: lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The tests that start no service (Ray, S3, MLflow, Serve): a change checked in minutes.
quick: lint
	$(VENV)/bin/python -m pytest -m "not stack" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

install: $(VENV)/.installed

$(VENV)/.installed: $(INSTALL_INPUTS)
	bash cluster/env/install.sh $(VENV)
	@touch $@

$(VENV)/.installed-test: $(INSTALL_INPUTS)
	bash cluster/env/install.sh $(VENV) test
	@touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) demo-results .pytest_cache
