# ringkv: the two commands a new machine needs are `make run` and `make test`.
# Both install what is missing. Builds go to CARGO_TARGET_DIR outside the clone so the
# ~20-minute RocksDB build is reused, and everything uses ONE cargo profile (release).

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/ringkv-target
CARGO_HOME_BIN := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin
BIN := $(CARGO_TARGET_DIR)/release
DATA ?= $(CURDIR)/data
PORT ?= 7379

JEPSEN_OUT ?= $(CURDIR)/jepsen-results

BENCH_OUT ?= $(CURDIR)/bench-results

.PHONY: deps build install run test jepsen bench lint fmt clean-data

deps:
	@need=""; \
	dpkg -s libclang-dev >/dev/null 2>&1 || need="$$need libclang-dev"; \
	command -v g++ >/dev/null 2>&1 || need="$$need g++"; \
	command -v make >/dev/null 2>&1 || need="$$need make"; \
	command -v ip >/dev/null 2>&1 || need="$$need iproute2"; \
	command -v iptables >/dev/null 2>&1 || need="$$need iptables"; \
	[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || need="$$need libfaketime"; \
	if [ -n "$$need" ]; then \
	  echo "==> installing system packages:$$need"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need; \
	fi
	@# promtool (Debian package prometheus) checks the /metrics exposition and the alert rules in the tests.
	@if ! command -v promtool >/dev/null 2>&1; then \
	  echo "==> installing promtool (package prometheus, without its recommends)"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; \
	fi
	@command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup first"; exit 1; }

build: deps
	@echo "==> building release binaries into $(BIN) (first build compiles RocksDB: ~20 min on 2 cores)"
	cargo build --release --workspace --bins

# Puts kvctl and ringkv on the PATH (symlinks into cargo's bin dir).
install: build
	@mkdir -p "$(CARGO_HOME_BIN)"
	@ln -sf "$(BIN)/kvctl" "$(CARGO_HOME_BIN)/kvctl"
	@ln -sf "$(BIN)/ringkv" "$(CARGO_HOME_BIN)/ringkv"
	@echo "==> kvctl and ringkv linked into $(CARGO_HOME_BIN)"

# A local 3-node cluster (N=3, R=2, W=2) with data in ./data; ctrl-c stops it cleanly.
run: install
	@echo "(if kvctl is not found in another terminal: export PATH=\"$(CARGO_HOME_BIN):\$$PATH\")"
	@exec tools/local-cluster.sh "$(BIN)" "$(DATA)" $(PORT)

test: deps
	@# Libraries too: the power-loss tests preload tests/powerloss's libringkv_powerloss.so.
	cargo build --release --workspace
	@# Four tests at a time per test binary (libtest's default is one per core, two here):
	@# the integration tests spend most of their time waiting on gossip, transfers and
	@# settle timers (the machine was 15-50% busy with four), so this halves their wall time.
	cargo test --release --workspace -- --test-threads 4
	@echo "==> Jepsen-style consistency checks (short CI profile; histories in $(JEPSEN_OUT))"
	"$(BIN)/ringkv-jepsen" --profile ci --out "$(JEPSEN_OUT)"

# The full consistency profile: longer runs of every nemesis combination (about an hour).
jepsen: deps
	cargo build --release --workspace
	@echo "==> single runs look like:"
	@echo "    $(BIN)/ringkv-jepsen --workload register --nemesis kill,partition --time-limit 60"
	@echo "    $(BIN)/ringkv-jepsen --workload set --nemesis pause,clock --time-limit 60 --seed 7"
	@echo "    $(BIN)/ringkv-jepsen --workload register --nemesis partition,loss --time-limit 120"
	@echo "==> running the full profile; histories and summaries in $(JEPSEN_OUT)"
	"$(BIN)/ringkv-jepsen" --profile full --out "$(JEPSEN_OUT)"

# ringkv (1 node, 3 nodes) next to Redis, etcd and Garage K2V on loopback, same generator, then
# ringkv 3 nodes vs Garage K2V 3 nodes in workloads A, B, C, interleaved 3 times (GARAGE=0 skips
# Garage; its first install builds it with cargo, ~20 min, once); see docs/benchmarks.md.
bench: deps build
	@need=""; command -v redis-server >/dev/null 2>&1 || need="$$need redis-server"; \
	command -v etcd >/dev/null 2>&1 || need="$$need etcd-server"; \
	if [ -n "$$need" ]; then \
	  echo "==> installing baselines:$$need"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need; \
	fi
	@out="$(BENCH_OUT)/$$(date +%Y%m%d-%H%M%S)"; \
	tools/bench.sh "$(BIN)" "$$out" && \
	if [ "$${GARAGE:-1}" != 0 ]; then tools/k2v-bench.py "$(BIN)" "$$out/k2v" --rounds 3; fi

lint: deps
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean-data:
	rm -rf "$(DATA)"
