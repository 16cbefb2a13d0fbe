# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch must be pinned and installed first: on these machines 2.13.0 is a CPU wheel on disk,
# while any looser request pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# fails when anything has replaced the pinned torch
TORCH_CHECK = $(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	sys.exit(0 if v == '$(TORCH_PIN)'.split('==')[1] else f'torch {torch.__version__} is installed instead of $(TORCH_PIN)')"

.PHONY: install demo test lint bench bench-peer clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	echo "$(TORCH_PIN)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -e ".[dev]" -c $(VENV)/torch-constraint.txt
	@$(TORCH_CHECK)
	touch $@

# The main job: every claim of the lab, measured, and a self-contained report in steadygrad-report/.
demo: install
	$(VENV)/bin/steadygrad demo --out steadygrad-report

# pytest exits 5 when it collected no tests: that must fail loudly, never pass.
# The HTML report is checked in a real browser: install Debian's chromium when it is missing and we can
# (root, network to the package mirror); otherwise that one test is skipped and says why.
test: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "make test: chromium could not be installed; the browser test of the report will be skipped"
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

# The Monitor benchmark's peer (cockpit-for-pytorch), without its dependencies: they would pull another torch.
# benchmarks/peer-requirements.txt says why that is safe. The torch check after it must still pass.
bench-peer: install
	$(PY) -m pip install --quiet --no-deps -r benchmarks/peer-requirements.txt
	@$(TORCH_CHECK)

# Without the peer (no package index, say) the benchmarks still run, and the peer's row says why it is missing.
bench: install
	@$(MAKE) --no-print-directory bench-peer \
		|| echo "make bench: cockpit-for-pytorch could not be installed; the Monitor table will say it is missing"
	@$(TORCH_CHECK)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
