# Shared by bench.sh and open-loop.sh (sourced, not run): starting servers on loopback and
# waiting for them. The caller sets $bin (the binaries' folder), $work (scratch dir) and an
# array pids, and kills "${pids[@]}" on exit.

# start CMD...: runs CMD in the background, output appended to $work/servers.log.
start() { "$@" >>"$work/servers.log" 2>&1 & pids+=($!); }

# ready NAME CMD...: retries CMD for up to 30 s; exits 2 with the servers' log if it never succeeds.
ready() {
  local name=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "${0##*/}: $name did not become ready; see $work/servers.log" >&2; cat "$work/servers.log" >&2; exit 2
}

# probe TARGET ADDR: one operation through kvbench.
probe() { "$bin/kvbench" --target "$1" --addr "$2" --records 1 --ops 1 --connections 1 --depth 1 --duration 1 --timeout-ms 1000 --json; }

# start_ringkv3 BASE_PORT [ARG...]: three ringkv nodes c1..c3 (N=3, R=2, W=2) with client
# ports BASE_PORT, +10, +20 (peers and gossip on the port after each), extra ARGs to each.
# Sets ringkv3_addrs to their client addresses, comma-separated.
start_ringkv3() {
  local base=$1 i c; shift
  ringkv3_addrs=""
  for i in 1 2 3; do
    c=$((base + 10 * (i - 1)))
    local seeds=(); [ "$i" -gt 1 ] && seeds=(--seeds "127.0.0.1:$((base + 1))")
    start "$bin/ringkv" --node-id "c$i" --n 3 --r 2 --w 2 --listen "127.0.0.1:$c" \
      --peer-listen "127.0.0.1:$((c + 1))" --gossip-listen "127.0.0.1:$((c + 1))" \
      --data-dir "$work/c$i" --log warn "${seeds[@]}" "$@"
    ringkv3_addrs="$ringkv3_addrs${ringkv3_addrs:+,}127.0.0.1:$c"
  done
}
