# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch must be pinned and installed first: on these machines 2.13.0 is a CPU wheel on disk,
# while any looser request pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$(TORCH_PIN)'.split('==')[1] else f'torch {torch.__version__} was installed instead of $(TORCH_PIN)')"
	touch $@

# Until the lab's `steadygrad demo` exists: He vs Glorot on a 30-layer ReLU net, theory beside measurement.
DEMO_OUT := steadygrad-report
demo: install
	$(VENV)/bin/steadygrad inits --fan-in 10 --fan-out 32
	$(VENV)/bin/steadygrad probe --depth 30 --width 256 --act relu --init he_uniform,glorot_uniform \
		--theory --plot $(DEMO_OUT)/probe.png --json $(DEMO_OUT)/probe.json

# pytest exits 5 when it collected no tests: that must fail loudly, never pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
