# Entry points. Each public target first runs scripts/deps.sh, which installs the Debian
# packages it needs (as root) or says which are missing, before anything is compiled.
# Everything that touches network namespaces needs root.
CARGO ?= cargo
DEPS = bash scripts/deps.sh

.PHONY: all deps build demo test chart chart-test _chart-test lint bench e2e fuzz release _static-plugin image image-check clean

# The plugin runs on hosts with any libc: it is linked statically (glibc's static libraries,
# from libc6-dev; a static PIE). `--target` keeps these flags off build scripts and
# proc-macros, and the output in its own directory.
STATIC_TARGET = x86_64-unknown-linux-gnu
STATIC_ENV = CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"

all: build

## Install what every target needs (the set-up that the other targets do on their own).
deps:
	@$(DEPS) deps

build:
	@$(DEPS) build
	$(CARGO) build --workspace --bins

## The main job on a built-in example: a demo pod netns with the chain, its rules, and a
## redirected connection. Builds only the plugin and the demo, without the containerd
## client (no protoc needed).
demo:
	@$(DEPS) demo
	$(CARGO) build --quiet -p istio-cni -p istio-cni-e2e --no-default-features --bins
	$(CARGO) run --quiet -p istio-cni-e2e --no-default-features --bin istio-cni-demo

## Every test: unit, conformance (cni-plugin/tests/conformance), netns end to end, and the
## Helm chart (rendered and linted by Helm's own engine, in a venv).
test:
	@$(DEPS) test
	$(CARGO) build --workspace --bins
	@$(MAKE) --no-print-directory _static-plugin PROFILE_FLAG=
	@$(MAKE) --no-print-directory _chart-test
	ISTIO_CNI_STATIC_BIN=$(CURDIR)/target/$(STATIC_TARGET)/debug/istio-cni $(CARGO) test --workspace

_static-plugin:
	$(STATIC_ENV) $(CARGO) build $(PROFILE_FLAG) --target $(STATIC_TARGET) -p istio-cni --bin istio-cni

## The binaries that ship: the static plugin and the agent (dynamic, against the image's
## glibc, so that it can resolve host names through NSS), release profile.
release:
	@$(DEPS) release
	@$(MAKE) --no-print-directory _static-plugin PROFILE_FLAG=--release
	$(CARGO) build --release -p istio-cni-node-agent --bin istio-cni-node-agent
	@file -b target/$(STATIC_TARGET)/release/istio-cni
	@ls -l target/$(STATIC_TARGET)/release/istio-cni target/release/istio-cni-node-agent

# The chart's Python tools (Helm 4 SDK, Kubernetes schemas, CEL), pinned.
VENV ?= .venv
$(VENV)/.installed: charts/tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r charts/tests/requirements.txt
	touch $@

## The chart's tests: render/lint every profile and mode, OpenAPI validation, security
## properties, RBAC, values schema, the admission policy's CEL, the agent's command line.
chart-test:
	@$(DEPS) test
	$(CARGO) build --workspace --bins
	@$(MAKE) --no-print-directory _chart-test

_chart-test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q charts/tests

## Lint the chart (every profile) and package it into target/chart/.
chart:
	@$(DEPS) test
	@$(MAKE) --no-print-directory $(VENV)/.installed
	$(VENV)/bin/python charts/chart.py target/chart

## ADD wall time over 200 pod netns against the iptables floor measured in the same run,
## the static release plugin interleaved with the dynamic one, then 50 concurrent ADDs; then the repair loop's sweep over 500 running pods and its
## flush-to-repaired time. Prints ratios; asserts no timing.
bench:
	@$(DEPS) bench
	$(CARGO) build --release --workspace --no-default-features --bins
	@$(MAKE) --no-print-directory release
	ISTIO_CNI_STATIC_BIN=target/$(STATIC_TARGET)/release/istio-cni ./target/release/istio-cni-bench 200
	./target/release/istio-cni-repair-bench 500
	./target/release/istio-cni-ambient-bench 50

## The node agent's OCI image, from Debian packages (mmdebstrap + umoci, no registry, no
## daemon): target/image/istio-cni-node-agent-<version>.oci.tar; the digest is the last line.
image:
	@$(DEPS) image
	@$(MAKE) --no-print-directory release
	bash scripts/image.sh target/image

## Builds the image twice from the same commit and compares the digests (reproducible).
image-check: image
	@start=$$(date +%s); \
	    bash scripts/image.sh target/image-again >/dev/null && bash scripts/image.sh target/image >/dev/null && \
	    if cmp -s target/image/digest target/image-again/digest; then \
	        echo "image: reproducible, $$(cat target/image/digest) twice ($$(( $$(date +%s) - start )) s)"; \
	    else echo "image: NOT reproducible: $$(cat target/image/digest) vs $$(cat target/image-again/digest)"; exit 1; fi

## The end-to-end acceptance tests: the image (reproducible, imports into containerd, runs);
## the chart's DaemonSet as Helm renders it, run from that image through containerd's CRI
## on a test node (install, host-side self-test, untaint, pods, upgrade, uninstall, a node
## without iptables); then the node lifecycle: containerd + the real agent and plugin over
## one node's life (join, gate, schedule, break, repair, upgrade, uninstall), a line per step;
## and ambient mode against the real ztunnel (ZDS, and ADD of an ambient pod through the agent).
e2e:
	@$(DEPS) e2e
	$(CARGO) build --workspace --bins
	@$(MAKE) --no-print-directory image-check
	@$(MAKE) --no-print-directory $(VENV)/.installed
	@mkdir -p target/e2e
	$(VENV)/bin/python charts/render.py target/e2e/chart.json
	ISTIO_CNI_IMAGE=$$(ls $(CURDIR)/target/image/istio-cni-node-agent-*.oci.tar) \
	    $(CARGO) test -p istio-cni-e2e --test image -- --ignored --nocapture
	ISTIO_CNI_IMAGE=$$(ls $(CURDIR)/target/image/istio-cni-node-agent-*.oci.tar) \
	ISTIO_CNI_CHART=$(CURDIR)/target/e2e/chart.json \
	    $(CARGO) test -p istio-cni-e2e --test daemonset -- --ignored --nocapture --test-threads 1
	$(CARGO) test -p istio-cni-e2e --test lifecycle -- --ignored --nocapture
	$(CARGO) test -p istio-cni-node-agent --test ztunnel_zds --test ambient -- --ignored --nocapture

## Fuzz the plugin's parsers with cargo-fuzz (nightly): netconf, CNI environment,
## prevResult conversion, annotations → rules, the iptables-save canonical form, the
## nftables compiler, the nf_tables dump decoder. Each target
## runs FUZZ_SECONDS (60) from the seeds in cni-plugin/fuzz/seeds; any crash fails it, and
## its input is kept in target/fuzz/artifacts/. Not part of `make test`.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= netconf cni_env prev_result annotations canon nft_compile plugin_event zds nft_wire
fuzz:
	@$(DEPS) fuzz
	@command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
	@mkdir -p target/fuzz
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p target/fuzz/corpus/$$t target/fuzz/artifacts/$$t; \
	    echo "== fuzz $$t for $(FUZZ_SECONDS) s (log: target/fuzz/$$t.log)"; \
	    if ! (cd cni-plugin/fuzz && cargo +nightly fuzz run $$t \
	            ../../target/fuzz/corpus/$$t seeds/$$t -- \
	            -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	            -artifact_prefix=../../target/fuzz/artifacts/$$t/) >target/fuzz/$$t.log 2>&1; then \
	        tail -n 40 target/fuzz/$$t.log; echo "== fuzz $$t: FAILED"; exit 1; \
	    fi; \
	    grep -E 'stat::number_of_executed_units|stat::new_units_added' target/fuzz/$$t.log; \
	done

lint:
	@$(DEPS) lint
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p istio-cni-e2e --no-default-features --all-targets -- -D warnings

clean:
	$(CARGO) clean
