# butler — build, run and check targets. `make help` lists them.

CARGO ?= cargo
CONFIG ?= butler.yaml
BIN := target/release/butler
STATIC_TARGET := x86_64-unknown-linux-gnu
STATIC_BIN := target/$(STATIC_TARGET)/release/butler

.PHONY: help build run test lint fmt static docker bench clean

help:
	@echo "make build    release binary in $(BIN)"
	@echo "make run      build, create $(CONFIG) with 'butler init' if missing, start butler"
	@echo "make test     everything CI runs: rustfmt check, clippy, all tests"
	@echo "make lint     rustfmt check and clippy (warnings are errors)"
	@echo "make fmt      reformat the code"
	@echo "make static   statically linked x86_64 glibc binary in $(STATIC_BIN)"
	@echo "make docker   build the container image 'butler'"
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

clean:
	$(CARGO) clean
