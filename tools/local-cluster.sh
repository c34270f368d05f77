#!/usr/bin/env bash
# Runs a local 3-node ringkv cluster (N=3, R=2, W=2) in the foreground; ctrl-c stops all three
# cleanly (SIGTERM: in-flight requests finish, storage closes).
# usage: local-cluster.sh BIN_DIR DATA_DIR [BASE_PORT]
# Node i listens for clients on BASE_PORT+2(i-1) and for peers on the port after it (TCP),
# gossips on BASE_PORT+100+2(i-1) (UDP), and serves /metrics, /health and /ready on
# BASE_PORT+200+(i-1) (HTTP; docs/prometheus.yml scrapes them).
set -euo pipefail
bin=${1:?usage: local-cluster.sh BIN_DIR DATA_DIR [BASE_PORT]}
data=${2:?usage: local-cluster.sh BIN_DIR DATA_DIR [BASE_PORT]}
base=${3:-7379}
pids=()
tailer=""

stop() {
  trap - INT TERM
  echo
  echo "==> stopping the cluster"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  sleep 0.2
  [ -n "$tailer" ] && kill "$tailer" 2>/dev/null
  echo "==> all nodes stopped; data kept in $data"
  exit 0
}
trap stop INT TERM

# The cluster secret authenticates gossip and peer connections. Unless RINGKV_CLUSTER_SECRET
# is set, the local cluster gets a random one, kept (mode 600) in the data folder so restarts
# reuse it; it is never printed.
mkdir -p "$data"
if [ -z "${RINGKV_CLUSTER_SECRET:-}" ]; then
  if [ ! -s "$data/cluster.secret" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 > "$data/cluster.secret")
  fi
  RINGKV_CLUSTER_SECRET=$(cat "$data/cluster.secret")
fi
export RINGKV_CLUSTER_SECRET

seed=127.0.0.1:$((base + 100))
for i in 1 2 3; do
  client=$((base + 2 * (i - 1)))
  peer=$((client + 1))
  gossip=$((client + 100))
  admin=$((base + 200 + i - 1))
  mkdir -p "$data/n$i"
  rm -f "$data/n$i/ringkv.addr"
  seeds=()
  [ "$i" -gt 1 ] && seeds=(--seeds "$seed")
  touch "$data/n$i.log"
  # Logs go to files (a ctrl-c must not kill a log pipe the nodes still write to).
  "$bin/ringkv" --node-id "n$i" --listen "127.0.0.1:$client" --peer-listen "127.0.0.1:$peer" \
    --gossip-listen "127.0.0.1:$gossip" --admin-listen "127.0.0.1:$admin" \
    --data-dir "$data/n$i" --n 3 --r 2 --w 2 "${seeds[@]}" 2>>"$data/n$i.log" &
  pids+=($!)
done
# Follow the logs; the follower ignores ctrl-c so the shutdown lines are shown too.
(trap '' INT; exec tail -n 0 -F "$data/n1.log" "$data/n2.log" "$data/n3.log") &
tailer=$!

for i in 1 2 3; do
  for _ in $(seq 1 600); do
    [ -f "$data/n$i/ringkv.addr" ] && break
    if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
      echo "node n$i failed to start; see $data/n$i.log" >&2
      stop
    fi
    sleep 0.1
  done
done

# Ready = every node answers reads (a node refuses to coordinate until it knows the ring).
for i in 1 2 3; do
  for _ in $(seq 1 300); do
    set +e
    "$bin/kvctl" --addr "127.0.0.1:$((base + 2 * (i - 1)))" --timeout-ms 1000 get ringkv-ready-probe >/dev/null 2>&1
    rc=$?
    set -e
    [ "$rc" -le 1 ] && break
    sleep 0.1
  done
done

cat <<MSG

==> ringkv cluster up: n1 127.0.0.1:$base, n2 127.0.0.1:$((base + 2)), n3 127.0.0.1:$((base + 4))
    N=3 R=2 W=2, data in $data, logs in $data/n*.log. Ctrl-c stops all three.
    Nodes authenticate each other with the secret in $data/cluster.secret.
    In another terminal:
      kvctl put greeting hello                           # through n1 (the default --addr)
      kvctl --addr 127.0.0.1:$((base + 4)) get greeting           # through n3
      kvctl ring                                         # members, tokens, ownership
      kvctl members                                      # SWIM state, incarnation, phi
      kvctl --addr 127.0.0.1:$((base + 2)) get --local greeting   # n2's own replica
      kvctl put --w 3 k v; kvctl get --r 3 k             # per-request quorums
      curl -s 127.0.0.1:$((base + 200))/metrics | head      # Prometheus metrics (n1; n2, n3 on the next ports)
      curl -s 127.0.0.1:$((base + 200))/ready               # readiness (also /health)
    Prometheus and Grafana: docs/prometheus.yml, docs/grafana-dashboard.json (docs/operations.md).

MSG
wait
