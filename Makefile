# Kaggle image-classification pipeline: each stage is a file target, so make reruns only what changed.
# Usage: make demo | make lowdata | make all COMP=<comp> | make auto COMP=<comp> BUDGET=30m | make tune EXP=<config> | make test | make bench | make help
# FORCE=1 reruns the goal's own stage (EXP=<name> picks one experiment), nothing upstream.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.SECONDEXPANSION:
.DELETE_ON_ERROR:

COMP ?=
EXP ?=
FORCE ?=
SET ?=
DEVICE ?=
GPUS ?= 1
KEEP ?=
BUDGET ?=
VENV := .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
# PY=python3 (an interpreter with the requirements, e.g. on a GPU box) skips the virtual environment
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
OVERRIDES := $(SET) $(if $(DEVICE),device=$(DEVICE))
TRAIN := $(if $(filter-out 1,$(GPUS)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(GPUS) -m pipeline.train,$(PY) -m pipeline.train)
CONF := configs/$(COMP)
# An ensemble config lists its `experiments:`; every other config of COMP's folder is an experiment.
ENSEMBLES := $(basename $(notdir $(shell grep -l '^experiments:' $(CONF)/*.yaml 2>/dev/null)))
EXPS := $(filter-out competition auto $(ENSEMBLES) %.tune,$(basename $(notdir $(wildcard $(CONF)/*.yaml))))
# EXP=<name> (or configs/<comp>/<name>.yaml) narrows train and predict to one experiment
PICKED := $(if $(EXP),$(basename $(notdir $(EXP))),$(EXPS))
OOFS := $(PICKED:%=runs/$(COMP)/%/oof.csv)
TESTS := $(PICKED:%=runs/$(COMP)/%/test.csv)
WEIGHTS := runs/$(COMP)/ensemble/weights.json
ALL_WEIGHTS := $(ENSEMBLES:%=runs/$(COMP)/%/weights.json)
SUBMISSION := submissions/$(COMP).csv
PACKAGE ?= packages/$(COMP)
PACKAGE_HALF ?=
TEST_IMAGES ?=
SAMPLE ?=
OUT ?= submissions/$(COMP)-infer.csv

# Targets that work on one competition: refuse, in one line, a missing or unknown COMP or EXP.
COMP_GOALS := all auto folds train predict ensemble submit package leaderboard prune
COMPS := $(notdir $(patsubst %/competition.yaml,%,$(wildcard configs/*/competition.yaml)))
ifneq ($(filter $(COMP_GOALS),$(MAKECMDGOALS)),)
ifeq ($(COMP),)
$(error COMP is not set: say which competition, e.g. make $(firstword $(filter $(COMP_GOALS),$(MAKECMDGOALS))) COMP=$(firstword $(COMPS)) (configs/ has: $(COMPS)))
else ifeq ($(wildcard configs/$(COMP)/competition.yaml),)
$(error configs/$(COMP)/competition.yaml not found: COMP=$(COMP) is not a competition (configs/ has: $(COMPS)))
else ifneq ($(filter-out $(EXPS),$(PICKED)),)
$(error EXP=$(EXP): no experiment configs/$(COMP)/$(PICKED).yaml (configs/$(COMP) has: $(EXPS)))
endif
ifneq ($(filter auto,$(MAKECMDGOALS)),)
ifeq ($(BUDGET),)
$(error BUDGET is not set: say how long, e.g. make auto COMP=$(COMP) BUDGET=30m (90s, 2h, 1h30m))
endif
endif
# The runs each run needs first (an ensemble's members, a learner's sources), from the configs
# (not for auto alone: regenerating it restarts make, and auto's clock starts with make).
ifneq ($(filter-out auto,$(filter $(COMP_GOALS),$(MAKECMDGOALS))),)
-include runs/$(COMP)/deps.mk
endif
endif

runs/$(COMP)/deps.mk: $(wildcard $(CONF)/*.yaml) $(CONF) | $(SETUP)
	@$(PY) -m pipeline.folds $(CONF)/competition.yaml --deps $@ $(OVERRIDES)

# FORCE=1: the goals' own targets are out of date whatever their times (train starts a fresh
# version: the finished one moves to the history); nothing upstream is.
FORCED_folds = folds/$(COMP).csv
FORCED_train = $(OOFS)
FORCED_predict = $(TESTS)
FORCED_ensemble = $(ALL_WEIGHTS)
FORCED_submit = $(SUBMISSION)
FORCED_package = packages/$(COMP)/manifest.json
ifneq ($(FORCE),)
$(foreach goal,$(MAKECMDGOALS),$(FORCED_$(goal))): FORCE
endif

# Overrides (SET, DEVICE) only act where a stage runs: say so when none did.
MAKE_START := $(shell date +%s)
unchanged = @if [ -n "$(strip $(OVERRIDES))" ] && [ -z "$$(find $(1) -newermt @$(MAKE_START) 2>/dev/null)" ]; then \
	echo "note: $(strip $(OVERRIDES)): no effect, nothing was out of date; add FORCE=1 to rerun (EXP=<name> for one experiment)"; fi

LITE0 := weights/tf_efficientnet_lite0.safetensors

.PHONY: FORCE help setup demo lowdata all auto folds train predict ensemble submit package infer tune leaderboard prune test bench reports preview weights clean

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(SETUP) ## create .venv from requirements.txt

data/%/solution.csv: | $(SETUP)
	$(PY) -m pipeline.demo build --comp $*

# Before any stage: every config of the competition validated, and the data's hashes, rewritten
# only when the train table, the train images or the test images changed (quick: decode checks
# are remembered).
.PRECIOUS: runs/%/train-data.json runs/%/test-data.json  # records, not intermediate files
runs/%/train-data.json runs/%/test-data.json: FORCE | $(SETUP)
	+@$(PY) -m pipeline.folds configs/$*/competition.yaml --check $(OVERRIDES)

folds/%.csv: configs/%/competition.yaml runs/%/train-data.json | $(SETUP)
	$(PY) -m pipeline.folds $< $(OVERRIDES)

runs/%/oof.csv: configs/%.yaml configs/$$(*D)/competition.yaml folds/$$(*D).csv | $(SETUP)
	$(TRAIN) $< $(OVERRIDES) $(if $(FORCE),--fresh)

runs/%/test.csv: runs/%/oof.csv runs/$$(*D)/test-data.json
	$(PY) -m pipeline.predict configs/$*.yaml $(OVERRIDES)

runs/%/weights.json: configs/%.yaml | $(SETUP)
	$(PY) -m pipeline.ensemble $< $(OVERRIDES)

$(SUBMISSION): $(WEIGHTS)
	$(PY) -m pipeline.submit $(CONF)/ensemble.yaml $(OVERRIDES)

folds: folds/$(COMP).csv ## split the train table into folds (COMP=...)
	$(call unchanged,$^)
train: $(OOFS) ## train every experiment of COMP (or EXP=<name>) on every fold
	$(call unchanged,$^)
predict: $(TESTS) ## TTA predictions: OOF and test, per experiment (or EXP=<name>)
	$(call unchanged,$^)
ensemble: $(ALL_WEIGHTS) ## choose each ensemble's blend on the OOF (ensemble.yaml's is submitted)
	$(call unchanged,$^)
submit: $(SUBMISSION) ## write submissions/$(COMP).csv
	$(call unchanged,$^)
all: $(SUBMISSION) $(TESTS) $(ALL_WEIGHTS) ## folds, train, predict, ensemble (every config of COMP), submit
	$(call unchanged,$(SUBMISSION) $(ALL_WEIGHTS) $(TESTS) $(OOFS))

auto: folds/$(COMP).csv | $(SETUP) ## the best submission BUDGET allows from competition.yaml alone (BUDGET=30m; reruns resume)
	$(PY) -m pipeline.auto $(CONF)/competition.yaml --budget $(BUDGET) --since $(MAKE_START) $(OVERRIDES)

packages/$(COMP)/manifest.json: $(WEIGHTS)
	$(PY) -m pipeline.package $(CONF)/ensemble.yaml $(if $(PACKAGE_HALF),--half) $(OVERRIDES)

package: packages/$(COMP)/manifest.json ## inference package packages/$(COMP)/ (PACKAGE_HALF=1: float16 weights)
infer: $(SETUP) ## submission from a package alone (PACKAGE=, TEST_IMAGES=, SAMPLE=, OUT=; defaults from COMP's config)
	$(PY) -m pipeline.infer $(PACKAGE) $(if $(TEST_IMAGES),--test-images $(TEST_IMAGES)) $(if $(SAMPLE),--sample-submission $(SAMPLE)) $(if $(COMP),--config $(CONF)/competition.yaml) --out $(OUT)

leaderboard: | $(SETUP) ## every experiment and past version of COMP, sorted by CV
	$(PY) -m pipeline.leaderboard $(CONF)/competition.yaml $(SET)

prune: | $(SETUP) ## keep only the KEEP newest past versions of each experiment of COMP (their tuning studies too unless PRUNE_STUDIES=1)
	@test -n "$(KEEP)" || { echo "KEEP is not set: e.g. make prune COMP=$(COMP) KEEP=3 (0 keeps only the current runs)"; exit 2; }
	$(PY) -m pipeline.prune $(CONF)/competition.yaml --keep $(KEEP) $(if $(PRUNE_STUDIES),--studies)

$(LITE0): | $(SETUP)
	$(PY) -m pipeline.imagenet $@

weights: $(LITE0) ## convert the bundled ImageNet EfficientNet-Lite0 weights to timm format

# make tune: refuse, in one line, a missing EXP or a missing file.
TUNABLE = $(sort $(patsubst %.tune.yaml,%.yaml,$(wildcard configs/*/*.tune.yaml)) $(filter-out %.tune.yaml,$(shell grep -l '^tune:' configs/*/*.yaml 2>/dev/null)))
ifneq ($(filter tune,$(MAKECMDGOALS)),)
ifeq ($(origin EXP),file)
$(error EXP is not set: say which experiment to tune, e.g. make tune EXP=$(firstword $(TUNABLE) configs/<comp>/<exp>.yaml) (configs with a search space: $(or $(TUNABLE),none)))
else ifeq ($(wildcard $(EXP)),)
$(error EXP=$(EXP): no such file (configs with a search space: $(or $(TUNABLE),none)))
endif
endif

tune: $(SETUP) folds/$$(notdir $$(patsubst %/,%,$$(dir $$(EXP)))).csv ## optuna search over EXP's tune space -> <exp>-tuned.yaml (EXP=configs/<comp>/<exp>.yaml, required)
	$(PY) -m pipeline.tune $(EXP) $(OVERRIDES)

preview: $(SETUP) ## PNG grid of original vs augmented samples (EXP=configs/<comp>/<exp>.yaml)
	@test -n "$(EXP)" || { echo "EXP is not set: say which experiment, e.g. make preview EXP=configs/digits/lenet5.yaml"; exit 2; }
	$(PY) -m pipeline.preview $(EXP) $(OVERRIDES)

demo: $(SETUP) $(LITE0) data/digits/solution.csv ## build the digits demo and run the whole chain
	$(MAKE) --no-print-directory all COMP=digits PY=$(PY)
	$(PY) -m pipeline.demo score

lowdata: $(SETUP) $(LITE0) data/lowdata/solution.csv ## the low-data digits: every technique vs without it -> reports/techniques.md (slow)
	$(MAKE) --no-print-directory all COMP=lowdata PY=$(PY)
	$(PY) -m pipeline.demo score --comp lowdata
	$(PY) -m pipeline.bench.report_techniques

test: $(SETUP) ## run the test suite
	$(PY) -m pytest -q tests

bench: $(SETUP) ## benchmarks: data path, TTA, ensemble; DEVICE=cuda: the GPU device check
	$(if $(DEVICE),$(PY) -m pipeline.bench.device_check --device $(DEVICE),$(PY) -m pipeline.bench)

reports: $(SETUP) $(LITE0) data/digits/solution.csv ## rerun the committed CV comparison reports (slow; writes reports/*.md)
	$(MAKE) --no-print-directory predict COMP=digits
	$(PY) -m pipeline.bench.reports

clean: ## remove generated runs, folds, submissions and caches (keeps data/ and .venv)
	rm -rf runs cache folds/*.csv submissions/*.csv
