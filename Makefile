# butler — build, run and check targets. `make help` lists them.

CARGO ?= cargo
CONFIG ?= butler.yaml
BIN := target/release/butler
STATIC_TARGET := x86_64-unknown-linux-gnu
STATIC_BIN := target/$(STATIC_TARGET)/release/butler
PYTHON ?= python3
OIDC_VENV := target/venv-oidc

.PHONY: help build run test test-oidc lint fmt static docker bench fuzz clean

help:
	@echo "make build    release binary in $(BIN)"
	@echo "make run      build, create $(CONFIG) with 'butler init' if missing, start butler"
	@echo "make test     everything CI runs: rustfmt check, clippy, all tests, test-oidc"
	@echo "make test-oidc  end-to-end OIDC test against oidc-provider-mock (Python venv in $(OIDC_VENV))"
	@echo "make lint     rustfmt check and clippy (warnings are errors)"
	@echo "make fmt      reformat the code"
	@echo "make static   statically linked x86_64 glibc binary in $(STATIC_BIN)"
	@echo "make docker   build the container image 'butler'"
	@echo "make fuzz     fuzz the parsers for FUZZ_SECS each (needs nightly and cargo-fuzz)"
	@echo "make bench    measure req/s, latency, time to first token and memory"
	@echo "make clean    remove build output"

build:
	$(CARGO) build --release

run: build
	@if [ ! -e $(CONFIG) ]; then ./$(BIN) init $(CONFIG); fi
	./$(BIN) --config $(CONFIG)

# CI runs exactly this (through .ci/run).
# The bench is not a test: `cargo test` leaves it out, clippy --all-targets lints it.
test: lint
	$(CARGO) test
	$(MAKE) --no-print-directory test-oidc

# Butler against a real OIDC provider (PyPI's oidc-provider-mock behind TLS): a token from its
# authorization-code flow, used against butler. Needs python3 with venv; never skipped.
test-oidc: $(OIDC_VENV)/.installed
	@$(OIDC_VENV)/bin/python -c '' 2>/dev/null || { echo "error: the virtualenv $(OIDC_VENV) is broken; remove it and rerun make test-oidc" >&2; exit 1; }
	$(CARGO) build
	BUTLER_BIN=target/debug/butler $(OIDC_VENV)/bin/python tests/e2e/oidc_e2e.py

# Reinstalled only when requirements.txt is newer than the stamp.
$(OIDC_VENV)/.installed: tests/e2e/requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: test-oidc needs $(PYTHON) (Python 3 with the venv module; Debian: apt-get install python3 python3-venv)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: test-oidc needs Python >= 3.11 with the venv and ensurepip modules ($(PYTHON) lacks them; Debian: apt-get install python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(OIDC_VENV)
	$(OIDC_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
	touch $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

static:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(STATIC_TARGET)
	@file $(STATIC_BIN)
	@file $(STATIC_BIN) | grep -Eq 'statically linked|static-pie linked' \
		|| { echo "error: $(STATIC_BIN) is not statically linked" >&2; exit 1; }
	@echo "ldd: $$(ldd $(STATIC_BIN) 2>&1 | tr -s '\t\n' '  ')"
	@ldd $(STATIC_BIN) 2>&1 | grep -Eq 'not a dynamic executable|statically linked' \
		|| { echo "error: ldd lists shared libraries for $(STATIC_BIN)" >&2; exit 1; }
	./$(STATIC_BIN) --version

docker:
	docker build -t butler .

# Measures butler against direct upstream access; see docs/performance.md.
bench: build
	BUTLER_BIN=$(BIN) $(CARGO) bench --bench proxy

# Fuzz the pure parsers (not part of `make test`): FUZZ_SECS per target. Needs nightly Rust and
# cargo-fuzz (`cargo install cargo-fuzz`).
FUZZ_SECS ?= 60
FUZZ_TARGETS := head chunked config inspect usage model_name coding
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || { echo "error: make fuzz needs cargo-fuzz: cargo install cargo-fuzz" >&2; exit 1; }
	cd fuzz && for t in $(FUZZ_TARGETS); do cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECS) -rss_limit_mb=2048 || exit 1; done

clean:
	$(CARGO) clean
