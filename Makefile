# Two commands do all the set-up on a fresh machine (see README.md, Quickstart):
#   make demo   installs into .venv, then labels held-out digits with the bundled ViT on a local Ray
#   make test   installs into .venv, then runs ruff and the whole test suite (real S3 + real Ray)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# torch is pinned to the CPU build that lies on this project's machines; elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu to PIP_ARGS for a CPU-only wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_ARGS) "torch==2.13.0" -e ".[test,onnx]"
	$(BIN)/python -m compileall -q pipeline  # Ray starts many Python processes: none should compile vitpipe again
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

.PHONY: install demo test lint bench browser
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vitpipe demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts benchmarks

# A test renders the report pages in headless Chromium (Debian's package): installed when missing where
# this user may (root with apt-get); elsewhere that test says it skipped, and why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium fonts-dejavu-core >/dev/null; } || echo "make: chromium not installed; the page-rendering test will skip"

test: lint browser
	$(BIN)/pytest -p no:cacheprovider
