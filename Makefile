# defender-setup: `make` alone prints the targets (from their `## ` comments).
# Everything runs on Debian's interpreter (/usr/bin/python3), never whatever comes first on PATH.
PY      := /usr/bin/python3
SHELL   := /bin/bash

.DEFAULT_GOAL := help
.PHONY: help deps deb repo test test-full test-unit test-functional test-integration lint bench bench-fleet demo clean

help: ## show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

deps: ## install the Debian packages the build, tests and demo need (root)
	tools/install-deps

deb: ## build deb_dist/defender-setup{,-agent}_<version>-1_all.deb with stdeb
	tools/build-deb

repo: deb ## signed apt repository in repo/ (reprepro; REPO_KEY=<fingerprint>, else a local key)
	tools/make-repo --out repo $(if $(REPO_KEY),--key $(REPO_KEY)) deb_dist/defender-setup_*_all.deb deb_dist/defender-setup-agent_*_all.deb

test: deps test-unit test-functional test-integration ## all tests: unit, functional, then the .deb in booted containers

test-full: deps test-unit test-functional deb ## all tests, the booted ones on Debian 11, 12 and 13 each
	DEFENDER_SETUP_SUITES="bullseye bookworm trixie" tools/integration-test

test-unit: ## unit tests only: pure, in one process (seconds, no root needed)
	$(PY) -m pytest -q tests/unit

test-functional: ## processes and sockets: the agent against test hubs, fake systemctl, debconf, kills
	$(PY) -m pytest -q tests/functional

test-integration: deb ## install the built .debs into mmdebstrap images booted with systemd-nspawn
	tools/integration-test

lint: ## ruff (tools-only venv), shellcheck on maintainer scripts, lintian on the .deb
	tools/lint

bench: ## benchmarks: validate cold start vs openssl, restart verdicts, agent memory
	tools/bench

bench-fleet: ## N devices (default 20, N=...) from one image against one test hub, then apt upgrade (root)
	tools/bench-fleet $(if $(N),-n $(N))

demo: ## the main job end to end in a booted Debian 12 container
	tools/demo

clean: ## remove build output and caches
	rm -rf build dist deb_dist .build *.egg-info .pytest_cache
