#!/usr/bin/env bash
# make bench: ringkv (1 node, 3 nodes) next to Redis (1 node), etcd (3 members) and Garage's
# K2V API (3 nodes, replication factor 3, with and without metadata fsync), all on loopback,
# all driven by kvbench with the same workload; prints ops/s, latency and the servers' CPU per
# operation (from /proc) of every configuration, and ringkv/baseline ratios.
# usage: bench.sh BIN_DIR OUT_DIR    (env: WORKLOAD RECORDS VALUE DURATION CONN DEPTH DIST
#                                     GARAGE=0 to skip Garage)
set -euo pipefail
bin=${1:?usage: bench.sh BIN_DIR OUT_DIR}
out=${2:?usage: bench.sh BIN_DIR OUT_DIR}
WORKLOAD=${WORKLOAD:-a} RECORDS=${RECORDS:-100000} VALUE=${VALUE:-100} DURATION=${DURATION:-10}
CONN=${CONN:-8} DEPTH=${DEPTH:-16} DIST=${DIST:-zipfian} GARAGE=${GARAGE:-1}
tools=$(cd "$(dirname "$0")" && pwd)
# Garage builds once (~20 min) into ~/.cache/ringkv-garage before anything is started.
[ "$GARAGE" = 0 ] || "$tools/garage.py" install >/dev/null
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
# cpu_seconds PID...: user + system CPU of the processes so far (fields 14 and 15 of stat).
cpu_seconds() {
  local t=0 pid f
  for pid in "$@"; do
    f=$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null) || continue
    t=$((t + $(echo "$f" | awk '{print $12 + $13}')))
  done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}
run() { # run LABEL TARGET ADDRS CONN DEPTH SERVER_PID...
  local label=$1 target=$2 addrs=$3 conn=$4 depth=$5; shift 5
  echo "==> $label"
  # Exit 1 = completed with failed operations (counted in the summary, shown in the table).
  local rc=0 before after
  before=$(cpu_seconds "$@")
  "$bin/kvbench" --label "$label" --target "$target" --addr "$addrs" --connections "$conn" --depth "$depth" \
    "${common[@]}" --json-out "$out/$label.json" >"$out/$label.txt" || rc=$?
  after=$(cpu_seconds "$@")
  # The servers' CPU over the load and run phases, for CPU per operation in the summary.
  echo "$before $after" >"$out/$label.cpu"
  cat "$out/$label.txt"
  [ "$rc" -le 1 ] || { echo "bench: $label could not run" >&2; exit 2; }
}
# Each ringkv configuration is stopped after its run, so that its leftover background work
# (memtable flushes, compactions of what the run wrote) does not run during the next ones.
stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
run ringkv-1node ringkv 127.0.0.1:17379 "$CONN" "$DEPTH" "${pids[0]}"
stop "${pids[0]}"
run ringkv-1node-nosync ringkv 127.0.0.1:17479 "$CONN" "$DEPTH" "${pids[1]}"
stop "${pids[1]}"
run ringkv-3node ringkv "$ringkv3_addrs" "$CONN" "$DEPTH" "${pids[2]}" "${pids[3]}" "${pids[4]}"
stop "${pids[2]}" "${pids[3]}" "${pids[4]}"
run redis redis 127.0.0.1:16379 "$CONN" "$DEPTH" "${pids[5]}"
stop "${pids[5]}"
# The etcd gateway speaks HTTP/1.1 without pipelining: the same concurrency as connections.
run etcd-3node etcd 127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399 $((CONN * DEPTH)) 1 \
  "${pids[6]}" "${pids[7]}" "${pids[8]}"
stop "${pids[6]}" "${pids[7]}" "${pids[8]}"
configs=(ringkv-1node ringkv-1node-nosync ringkv-3node redis etcd-3node)
if [ "$GARAGE" != 0 ]; then
  # Garage K2V, 3 nodes, replication factor 3: with metadata fsync (as durable as ringkv's
  # group sync) and with Garage's default (no fsync, as ringkv's --sync none). One cluster at a
  # time, like the others; HTTP/1.1 without pipelining: CONN x DEPTH connections.
  for g in fsync nofsync; do
    fsync=on; [ "$g" = fsync ] || fsync=off
    eval "$("$tools/garage.py" start "$work/garage-$g" 13900 --fsync "$fsync")"
    pids+=($garage_pids)
    # The layout reaches every node's K2V endpoint shortly after `layout apply`.
    for a in ${garage_addrs//,/ }; do ready "garage-k2v ($g, $a)" probe garage-k2v "$a"; done
    # shellcheck disable=SC2086
    run "garage-k2v-3node-$g" garage-k2v "$garage_addrs" $((CONN * DEPTH)) 1 $garage_pids
    # shellcheck disable=SC2086
    stop $garage_pids
    configs+=("garage-k2v-3node-$g")
  done
fi

python3 - "$out" "${configs[@]}" <<'PY'
import json, sys, os
out = sys.argv[1]
r = {n: json.load(open(os.path.join(out, n + ".json"))) for n in sys.argv[2:]}
def cpu_us_per_op(n):
    before, after = map(float, open(os.path.join(out, n + ".cpu")).read().split())
    s = r[n]
    ops = s["run"]["ops"] + (s.get("load") or {}).get("ops", 0)
    return (after - before) * 1e6 / max(ops, 1)
print("\n==> throughput (ops/s), run-phase latency (us), servers' CPU per operation (us, load + run)")
print(f"{'config':<26}{'ops/s':>10}{'p50':>8}{'p99':>8}{'p99.9':>8}{'errors':>8}{'cpu/op':>9}")
for n, s in r.items():
    a = s["run"]["all"]
    s["cpu_us_per_op"] = cpu_us_per_op(n)
    print(f"{n:<26}{s['run']['throughput']:>10.0f}{a['p50_us']:>8}{a['p99_us']:>8}{a['p999_us']:>8}{s['run']['errors']:>8}{s['cpu_us_per_op']:>9.1f}")
t = lambda n: r[n]["run"]["throughput"]
print("\n==> ratios")
print(f"ringkv-1node / redis        {t('ringkv-1node') / t('redis'):.2f}")
print(f"ringkv-1node-nosync / redis {t('ringkv-1node-nosync') / t('redis'):.2f}")
print(f"ringkv-3node / etcd-3node   {t('ringkv-3node') / t('etcd-3node'):.2f}")
print(f"ringkv-3node / redis        {t('ringkv-3node') / t('redis'):.2f}")
for g in ("fsync", "nofsync"):
    n = f"garage-k2v-3node-{g}"
    if n in r:
        print(f"ringkv-3node / {n:<24} {t('ringkv-3node') / t(n):.2f} ops/s, "
              f"{r['ringkv-3node']['cpu_us_per_op'] / r[n]['cpu_us_per_op']:.3f} CPU per op")
json.dump({n: {"throughput": t(n), "latency": r[n]["run"]["all"], "errors": r[n]["run"]["errors"],
               "cpu_us_per_op": r[n]["cpu_us_per_op"]} for n in r},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
echo "==> JSON summaries in $out"
