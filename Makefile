# Kaggle image-classification pipeline: each stage is a file target, so make reruns only what changed.
# Usage: make demo | make all COMP=<comp> | make test | make bench | make help
SHELL := /bin/bash
.DEFAULT_GOAL := help
.SECONDEXPANSION:
.DELETE_ON_ERROR:

COMP ?=
SET ?=
KEEP ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONF := configs/$(COMP)
EXPS := $(filter-out competition ensemble,$(basename $(notdir $(wildcard $(CONF)/*.yaml))))
OOFS := $(EXPS:%=runs/$(COMP)/%/oof.csv)
TESTS := $(EXPS:%=runs/$(COMP)/%/test.csv)
WEIGHTS := runs/$(COMP)/ensemble/weights.json
SUBMISSION := submissions/$(COMP).csv

# Targets that work on one competition: refuse, in one line, a missing or unknown COMP.
COMP_GOALS := all folds train predict ensemble submit leaderboard prune
COMPS := $(notdir $(patsubst %/competition.yaml,%,$(wildcard configs/*/competition.yaml)))
ifneq ($(filter $(COMP_GOALS),$(MAKECMDGOALS)),)
ifeq ($(COMP),)
$(error COMP is not set: say which competition, e.g. make $(firstword $(filter $(COMP_GOALS),$(MAKECMDGOALS))) COMP=$(firstword $(COMPS)) (configs/ has: $(COMPS)))
else ifeq ($(wildcard configs/$(COMP)/competition.yaml),)
$(error configs/$(COMP)/competition.yaml not found: COMP=$(COMP) is not a competition (configs/ has: $(COMPS)))
endif
endif

LITE0 := weights/tf_efficientnet_lite0.safetensors
EXP ?= configs/digits/lenet5.yaml

.PHONY: help setup demo all folds train predict ensemble submit leaderboard prune test bench reports preview weights clean

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(STAMP) ## create .venv from requirements.txt

data/digits/solution.csv: | $(STAMP)
	$(PY) -m pipeline.demo build

folds/%.csv: configs/%/competition.yaml | $(STAMP)
	$(PY) -m pipeline.folds $< $(SET)

runs/%/oof.csv: configs/%.yaml configs/$$(*D)/competition.yaml folds/$$(*D).csv | $(STAMP)
	$(PY) -m pipeline.train $< $(SET)

runs/%/test.csv: runs/%/oof.csv
	$(PY) -m pipeline.predict configs/$*.yaml $(SET)

$(WEIGHTS): $(CONF)/ensemble.yaml $(TESTS)
	$(PY) -m pipeline.ensemble $< $(SET)

$(SUBMISSION): $(WEIGHTS)
	$(PY) -m pipeline.submit $(CONF)/ensemble.yaml $(SET)

folds: folds/$(COMP).csv ## split the train table into folds (COMP=...)
train: $(OOFS) ## train every experiment of COMP on every fold
predict: $(TESTS) ## TTA predictions: OOF and test, per experiment
ensemble: $(WEIGHTS) ## tune blend weights on the OOF
submit: $(SUBMISSION) ## write submissions/$(COMP).csv
all: $(SUBMISSION) ## folds, train, predict, ensemble, submit for COMP

leaderboard: | $(STAMP) ## every experiment and past version of COMP, sorted by CV
	$(PY) -m pipeline.leaderboard $(CONF)/competition.yaml $(SET)

prune: | $(STAMP) ## keep only the KEEP newest past versions of each experiment of COMP
	@test -n "$(KEEP)" || { echo "KEEP is not set: e.g. make prune COMP=$(COMP) KEEP=3 (0 keeps only the current runs)"; exit 2; }
	$(PY) -m pipeline.runs $(CONF)/competition.yaml --keep $(KEEP)

$(LITE0): | $(STAMP)
	$(PY) -m pipeline.weights $@

weights: $(LITE0) ## convert the bundled ImageNet EfficientNet-Lite0 weights to timm format

preview: $(STAMP) ## PNG grid of original vs augmented samples (EXP=configs/<comp>/<exp>.yaml)
	$(PY) -m pipeline.preview $(EXP) $(SET)

demo: $(STAMP) $(LITE0) data/digits/solution.csv ## build the digits demo and run the whole chain
	$(MAKE) --no-print-directory all COMP=digits
	$(PY) -m pipeline.demo score

test: $(STAMP) ## run the test suite
	$(PY) -m pytest -q tests

bench: $(STAMP) ## benchmarks: data path, TTA and ensemble throughput
	$(PY) -m pipeline.bench

reports: $(STAMP) $(LITE0) data/digits/solution.csv ## rerun the committed CV comparison reports (slow; writes reports/*.md)
	$(MAKE) --no-print-directory predict COMP=digits
	$(PY) -m pipeline.bench.reports

clean: ## remove generated runs, folds, submissions and caches (keeps data/ and .venv)
	rm -rf runs cache folds/*.csv submissions/*.csv
