# The two commands of the README. Each installs the project into .venv on first use
# (cluster/env/install.sh; versions from cluster/env/constraints.txt) and skips the
# install afterwards until one of the install inputs changes.
VENV ?= .venv
PYTEST_ARGS ?=
INSTALL_INPUTS := pyproject.toml cluster/env/install.sh cluster/env/constraints.txt cluster/env/torchvision_compat.py

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(VENV)/bin/unilip demo

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: $(INSTALL_INPUTS)
	bash cluster/env/install.sh $(VENV)
	@touch $@

$(VENV)/.installed-test: $(INSTALL_INPUTS)
	bash cluster/env/install.sh $(VENV) test
	@touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) demo-results .pytest_cache
