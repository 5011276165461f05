# msdm: `make demo` runs the whole story on a local Ray cluster; `make test` runs the test suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench bench-all bench-quality bench-distill lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip || true
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the SoundFont synthesizer of pipelines.render: --no-deps skips pyaudio (live playback
	# only; it needs PortAudio to build)
	$(BIN)/python -m pip install -q --no-deps tinysoundfont==0.3.7
	# test-only: the official stack for tests/test_released.py; --no-deps skips its
	# data-science-types requirement (stub packages that shadow numpy's own typing)
	$(BIN)/python -m pip install -q --no-deps audio-diffusion-pytorch==0.0.43 einops einops-exts
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo --output demo_out
	@echo "report: demo_out/report/REPORT.md"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py $(ARGS)

bench-distill: $(STAMP)
	$(BIN)/python benchmarks/bench_distill.py $(ARGS)

bench-all: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_render.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_separate.py

lint: $(STAMP)
	$(BIN)/ruff check msdm pipelines tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format msdm pipelines tests benchmarks

clean:
	rm -rf demo_out bench_out .pytest_cache .ruff_cache
