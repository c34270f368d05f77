#!/usr/bin/env bash
# make bench: ringkv (1 node, 3 nodes) next to Redis (1 node) and etcd (3 members), all on
# loopback, all driven by kvbench with the same workload; prints ringkv/baseline ratios.
# usage: bench.sh BIN_DIR OUT_DIR    (env: WORKLOAD RECORDS VALUE DURATION CONN DEPTH DIST)
set -euo pipefail
bin=${1:?usage: bench.sh BIN_DIR OUT_DIR}
out=${2:?usage: bench.sh BIN_DIR OUT_DIR}
WORKLOAD=${WORKLOAD:-a} RECORDS=${RECORDS:-100000} VALUE=${VALUE:-100} DURATION=${DURATION:-10}
CONN=${CONN:-8} DEPTH=${DEPTH:-16} DIST=${DIST:-zipfian}
mkdir -p "$out"
work=$(mktemp -d /tmp/ringkv-bench.XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

. "$(dirname "$0")/bench-common.sh"

echo "==> starting servers (scratch data in $work)"
# One node takes all 8 x 16 requests of the closed loop: a client budget above that, so the
# peak is measured, not shed (the default, 128, would refuse part of it; the 3 nodes get
# about 43 each and keep the default). docs/operations.md, "Admission control".
one_node_budget=(--max-requests 1024)
start "$bin/ringkv" --node-id s1 --n 1 --listen 127.0.0.1:17379 --peer-listen 127.0.0.1:17380 \
  --gossip-listen 127.0.0.1:17380 --data-dir "$work/s1" --log warn "${one_node_budget[@]}"
start "$bin/ringkv" --node-id u1 --n 1 --sync none --listen 127.0.0.1:17479 --peer-listen 127.0.0.1:17480 \
  --gossip-listen 127.0.0.1:17480 --data-dir "$work/u1" --log warn "${one_node_budget[@]}"
start_ringkv3 18379
start redis-server --port 16379 --save "" --appendonly no --protected-mode no
cluster=e1=http://127.0.0.1:12380,e2=http://127.0.0.1:12390,e3=http://127.0.0.1:12400
for i in 1 2 3; do
  p=$((12370 + 10 * i))
  start etcd --name "e$i" --data-dir "$work/e$i" \
    --listen-client-urls "http://127.0.0.1:$((p - 1))" --advertise-client-urls "http://127.0.0.1:$((p - 1))" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --log-level error
done
ready ringkv-1node probe ringkv 127.0.0.1:17379
ready ringkv-1node-nosync probe ringkv 127.0.0.1:17479
for a in ${ringkv3_addrs//,/ }; do ready "ringkv-3node ($a)" probe ringkv "$a"; done
ready redis probe redis 127.0.0.1:16379
ready etcd probe etcd 127.0.0.1:12379

common=(--workload "$WORKLOAD" --records "$RECORDS" --value-size "$VALUE" --duration "$DURATION" --distribution "$DIST")
run() { # run LABEL TARGET ADDRS CONN DEPTH
  echo "==> $1"
  # Exit 1 = completed with failed operations (counted in the summary, shown in the table).
  local rc=0
  "$bin/kvbench" --label "$1" --target "$2" --addr "$3" --connections "$4" --depth "$5" "${common[@]}" \
    --json-out "$out/$1.json" >"$out/$1.txt" || rc=$?
  cat "$out/$1.txt"
  [ "$rc" -le 1 ] || { echo "bench: $1 could not run" >&2; exit 2; }
}
# Each ringkv configuration is stopped after its run, so that its leftover background work
# (memtable flushes, compactions of what the run wrote) does not run during the next ones.
stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
run ringkv-1node ringkv 127.0.0.1:17379 "$CONN" "$DEPTH"
stop "${pids[0]}"
run ringkv-1node-nosync ringkv 127.0.0.1:17479 "$CONN" "$DEPTH"
stop "${pids[1]}"
run ringkv-3node ringkv "$ringkv3_addrs" "$CONN" "$DEPTH"
stop "${pids[2]}" "${pids[3]}" "${pids[4]}"
run redis redis 127.0.0.1:16379 "$CONN" "$DEPTH"
# The etcd gateway speaks HTTP/1.1 without pipelining: the same concurrency as connections.
run etcd-3node etcd 127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399 $((CONN * DEPTH)) 1

python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
r = {n: json.load(open(os.path.join(out, n + ".json"))) for n in
     ["ringkv-1node", "ringkv-1node-nosync", "ringkv-3node", "redis", "etcd-3node"]}
print("\n==> throughput (ops/s) and run-phase latency (us)")
print(f"{'config':<22}{'ops/s':>10}{'p50':>8}{'p99':>8}{'p99.9':>8}{'errors':>8}")
for n, s in r.items():
    a = s["run"]["all"]
    print(f"{n:<22}{s['run']['throughput']:>10.0f}{a['p50_us']:>8}{a['p99_us']:>8}{a['p999_us']:>8}{s['run']['errors']:>8}")
t = lambda n: r[n]["run"]["throughput"]
print("\n==> ratios")
print(f"ringkv-1node / redis        {t('ringkv-1node') / t('redis'):.2f}")
print(f"ringkv-1node-nosync / redis {t('ringkv-1node-nosync') / t('redis'):.2f}")
print(f"ringkv-3node / etcd-3node   {t('ringkv-3node') / t('etcd-3node'):.2f}")
print(f"ringkv-3node / redis        {t('ringkv-3node') / t('redis'):.2f}")
json.dump({n: {"throughput": t(n), "latency": r[n]["run"]["all"], "errors": r[n]["run"]["errors"]} for n in r},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
echo "==> JSON summaries in $out"
