# `make demo` and `make test` work on a fresh clone: they create the virtual environment and
# install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# checkov pins packages the app's venv must not downgrade, so it lives in a venv of its own.
TOOLS ?= .venv-tools
NOW := 2026-05-31T11:00:00Z

.PHONY: demo demo-reset test bench validate install clean card-preview

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check checkov==3.3.30
	touch $@

install: $(VENV)/.installed node_modules/.installed $(TOOLS)/.installed

## One real cycle on the embedded defaults: local sample data, SQLite state in .demo/.
## Run it twice: the second run finds the same devices and reports 0 new.
demo: $(VENV)/.installed
	$(PY) -m alerter validate --settings samples/demo.settings.json
	$(PY) -m alerter run --settings samples/demo.settings.json --now $(NOW) --preview .demo/preview
	@echo
	$(PY) -m alerter state list --settings samples/demo.settings.json
	@echo
	@echo "Rendered payloads are in .demo/preview/. Run 'make demo' again: 0 new. 'make demo-reset' starts over."

demo-reset:
	rm -rf .demo

validate: $(VENV)/.installed
	$(PY) -m alerter validate

test: install
	CHECKOV_BIN=$(TOOLS)/bin/checkov $(PY) -m pytest

bench: install
	$(PY) bench/run.py
	$(PY) bench/table_bench.py

## Render the demo's Teams card and mail to docs/ with the Adaptive Cards JS library in headless
## Chromium. Needs Debian's chromium (apt-get install chromium) or CHROMIUM=/path/to/chrome.
card-preview: $(VENV)/.installed node_modules/.installed
	rm -rf .demo/card-preview
	STATE_PATH=.demo/card-preview/state.db $(PY) -m alerter run --settings samples/demo.settings.json --now $(NOW) --dry-run --preview .demo/card-preview
	node tools/card_preview.js "$$(ls .demo/card-preview/teams-*.json | head -n 1)" docs/teams-card.png
	node tools/card_preview.js "$$(ls .demo/card-preview/email-*.html | head -n 1)" docs/email.png --width 900

clean:
	rm -rf .demo .alerter .pytest_cache
