# redex: `make run` opens the app, `make test` runs the whole suite. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8501
PY     := $(VENV)/bin/python
APT    := $(shell if [ "$$(id -u)" = 0 ]; then echo apt-get; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then echo "sudo apt-get"; fi)

.PHONY: run test setup setup-test data browser bench reproduce clean

run: setup data
	@echo "redex: open http://$(HOST):$(PORT)"
	$(VENV)/bin/streamlit run app.py --server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

# The suite in TEST_WORKERS processes, one test file per worker (files share fixtures and servers).
TEST_WORKERS ?= 2
test: setup-test data browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

# Debian's Fashion-MNIST (the built-in demo), and Debian's wallpapers: 2400-4096 px WebP, PNG and JPEG
# photos that the tests build a small photo dataset from (tests/photos.py). Without apt, say how to get them.
data:
	@if [ -n "$$REDEX_DATA" ] || [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ -n "$(APT)" ]; then $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "redex: Fashion-MNIST demo data not found. Install Debian's package 'dataset-fashion-mnist'," \
	          "or set REDEX_DATA to a folder holding its four IDX .gz files. The app works without it on your own data."; fi
	@if [ -f /usr/share/backgrounds/gnome/symbolic-l.webp ] && [ -f /usr/share/backgrounds/2004default.jpg ]; then :; \
	elif [ -n "$(APT)" ]; then $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq gnome-backgrounds ukui-wallpapers >/dev/null; \
	else echo "redex: Debian's 'gnome-backgrounds' and 'ukui-wallpapers' not found; the tests on photos will be skipped." >&2; fi

# Debian's chromium + chromium-driver for the end-to-end browser tests.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ -n "$(APT)" ]; then $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq chromium chromium-driver >/dev/null; \
	else echo "redex: chromium not found and apt unusable; the browser tests will be skipped." >&2; fi

bench: setup data
	$(PY) bench/embed.py

# The paper's Figure 2 on Fashion-MNIST (40 min on 2 idle CPU cores; resumable: run it again after a stop).
reproduce: setup data
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/reproduce.py

clean:
	rm -rf $(VENV) cache/*.duckdb* cache/artifacts cache/jobs
