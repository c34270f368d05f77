#!/usr/bin/env bash
# Open-loop latency of a 3-node ringkv cluster (N=3, R=W=2) on loopback: loads the records,
# measures the closed-loop peak, then runs 10 s at fixed rates (percent of that peak, or
# absolute ops/s with a trailing "/s"). Latency counts from each request's intended start.
# usage: tools/open-loop.sh BIN_DIR [SYNC] [RATE...]   e.g. tools/open-loop.sh target/release group 25 50 75 1000/s
set -euo pipefail
bin=${1:?usage: open-loop.sh BIN_DIR [SYNC] [RATE...]}
sync=${2:-group}
shift $(( $# >= 2 ? 2 : 1 ))
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(25 50 75)
RECORDS=${RECORDS:-100000} VALUE=${VALUE:-100} DURATION=${DURATION:-10}
work=$(mktemp -d /tmp/ringkv-openloop.XXXXXX); pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
. "$(dirname "$0")/bench-common.sh"
start_ringkv3 28379 --sync "$sync"
addrs=$ringkv3_addrs
for a in ${addrs//,/ }; do ready "node $a" probe ringkv "$a"; done
common=(--target ringkv --addr "$addrs" --workload a --records "$RECORDS" --value-size "$VALUE"
        --duration "$DURATION" --connections 8 --depth 16 --json)
summary() {
  python3 -c '
import json, sys
s = json.load(sys.stdin); r = s["run"]; a = r["all"]
row = (sys.argv[1], r["throughput"], a["p50_us"], a["p95_us"], a["p99_us"], a["p999_us"], a["max_us"], r["errors"])
print("%-22s achieved %8.0f  p50 %7d  p95 %7d  p99 %7d  p99.9 %7d  max %7d  errors %d" % row)' "$1"
}
echo "==> sync=$sync: load $RECORDS records, then the closed-loop peak"
peak_json=$("$bin/kvbench" "${common[@]}")
peak=$(python3 -c 'import json,sys; print(int(json.load(sys.stdin)["run"]["throughput"]))' <<<"$peak_json")
summary "closed loop (peak)" <<<"$peak_json"
for r in "${rates[@]}"; do
  if [[ $r == */s ]]; then rate=${r%/s}; label="$rate ops/s"; else rate=$((peak * r / 100)); label="$r% ($rate ops/s)"; fi
  "$bin/kvbench" "${common[@]}" --no-load --rate "$rate" | summary "$label"
done
