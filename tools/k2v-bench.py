#!/usr/bin/env python3
"""ringkv 3 nodes next to Garage K2V 3 nodes, workloads A, B and C, interleaved (issue 19).

Four clusters on loopback, each loaded once with the same records (100 B values):
  ringkv-3node     N=3, R=W=2, --sync group (every acknowledged write fsynced, group commit)
  ringkv-nosync    the same with --sync none (WAL written, not fsynced: survives a process kill,
                   not a power loss)
  garage-fsync     replication factor 3 (quorums of 2), metadata_fsync = true
  garage-nofsync   the same with Garage's default, metadata_fsync = false
Then, per round, per workload (A 50/50, B 95/5, C read only; zipfian), each cluster in turn
runs kvbench for DURATION seconds, closed loop with 128 requests in flight (ringkv: 8
connections x 16 pipelined; Garage, HTTP/1.1 without pipelining: 128 connections x 1). The
clusters not under test are stopped (SIGSTOP) so that their background work does not run during
another's measurement, and resumed (SIGCONT) a few seconds before their own; after its load,
each cluster runs alone until its servers are idle (under 5% of a core), so that no
measurement pays for the load's leftover work. Per run: ops/s,
p50/p99/p99.9 of the run phase, and the servers' CPU per operation (user + system from /proc).

usage: tools/k2v-bench.py BIN_DIR OUT_DIR [--rounds 3] [--records 100000] [--duration 10]
Goal (issue 19): ringkv >= 10x Garage's ops/s, <= 1/10 of its CPU per op, lower p99, in A, B, C.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Cluster, cpu_seconds, kvbench, measured, wait_probe  # noqa: E402
import garage  # noqa: E402

WORKLOADS = ["a", "b", "c"]
CONFIGS = ["ringkv-3node", "ringkv-nosync", "garage-fsync", "garage-nofsync"]


class Target:
    """One cluster under test: how kvbench reaches it and how to pause it."""

    def __init__(self, name, cluster, addrs, target, conns, depth, env=None):
        self.name, self.cluster, self.addrs = name, cluster, addrs
        self.target, self.conns, self.depth, self.env = target, conns, depth, env or {}

    def signal(self, sig):
        for pid in self.cluster.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def args(self, workload, records, duration):
        return ["--workload", workload, "--records", str(records), "--value-size", "100",
                "--connections", str(self.conns), "--depth", str(self.depth),
                "--duration", str(duration), "--timeout-ms", "10000"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--settle", type=float, default=3, help="seconds after resuming a cluster")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    gbin = garage.install()
    work = tempfile.mkdtemp(prefix="ringkv-k2v-bench-")
    ringkv = Cluster(a.bin, work, 29379)
    ringkv_nosync = Cluster(a.bin, os.path.join(work, "nosync"), 29479, ["--sync", "none"])
    gf = garage.GarageCluster(gbin, os.path.join(work, "gf"), 13900, fsync=True)
    gn = garage.GarageCluster(gbin, os.path.join(work, "gn"), 13950, fsync=False)
    targets = []
    try:
        for r in (ringkv, ringkv_nosync):
            for i in (1, 2, 3):
                r.start(i)
            for i in (1, 2, 3):
                r.wait_ready(i)
        for g in (gf, gn):
            g.start()
            # The layout reaches every node's K2V endpoint shortly after `layout apply`.
            for addr in g.addrs().split(","):
                wait_probe(a.bin, addr, f"k2v-bench: Garage at {addr} did not answer K2V "
                           f"requests within 30 s", "garage-k2v", g.env(), timeout_ms=2000,
                           pause=0.2)
        targets = [
            Target("ringkv-3node", ringkv, [ringkv.addr(i) for i in (1, 2, 3)], "ringkv", 8, 16),
            Target("ringkv-nosync", ringkv_nosync, [ringkv_nosync.addr(i) for i in (1, 2, 3)],
                   "ringkv", 8, 16),
            Target("garage-fsync", gf, gf.addrs().split(","), "garage-k2v", 128, 1, gf.env()),
            Target("garage-nofsync", gn, gn.addrs().split(","), "garage-k2v", 128, 1, gn.env()),
        ]
        # Load each cluster alone (the others stopped), then leave all stopped.
        for t in targets:
            t.signal(signal.SIGSTOP)
        for t in targets:
            t.signal(signal.SIGCONT)
            time.sleep(a.settle)
            start = time.time()
            s = kvbench(a.bin, t.addrs, a.out, f"{t.name}-load",
                        t.args("a", a.records, 1) + ["--ops", "1"], t.target, t.env)
            load = s.get("load") or {}
            loaded = time.time() - start
            # Let the cluster finish what the load left (flushes, compactions, Merkle and table
            # syncs) alone before any measurement: until its servers use under 5% of a core.
            idle_after = quiesce(t.cluster.pids())
            print(f"{t.name}: loaded {a.records} records in {loaded:.0f} s "
                  f"({load.get('throughput', 0):.0f} writes/s, {load.get('errors', 0)} errors), "
                  f"idle {idle_after:.0f} s later", flush=True)
            t.signal(signal.SIGSTOP)
        rows = []
        print(f"\n{'round':<6}{'wl':<4}{'config':<16}{'ops/s':>9}{'p50 us':>9}{'p99 us':>9}"
              f"{'p99.9 us':>10}{'errors':>8}{'cpu us/op':>11}", flush=True)
        for rnd in range(1, a.rounds + 1):
            for wl in WORKLOADS:
                for t in targets:
                    t.signal(signal.SIGCONT)
                    time.sleep(a.settle)
                    label = f"r{rnd}-{wl}-{t.name}"
                    s = measured(a.bin, t.cluster, t.addrs, a.out, label,
                                 t.args(wl, a.records, a.duration) + ["--no-load"], t.target, t.env)
                    t.signal(signal.SIGSTOP)
                    r, al = s["run"], s["run"]["all"]
                    row = {"round": rnd, "workload": wl.upper(), "config": t.name,
                           "ops": r["throughput"], "p50": al["p50_us"], "p99": al["p99_us"],
                           "p999": al["p999_us"], "errors": r["errors"],
                           "cpu": s["cpu_us_per_op"]}
                    rows.append(row)
                    print(f"{rnd:<6}{row['workload']:<4}{t.name:<16}{row['ops']:>9.0f}"
                          f"{row['p50']:>9}{row['p99']:>9}{row['p999']:>10}{row['errors']:>8}"
                          f"{row['cpu']:>11.1f}", flush=True)
        with open(os.path.join(a.out, "k2v-bench.json"), "w") as f:
            json.dump(rows, f, indent=1)
        summarize(rows)
    finally:
        for t in targets:
            t.signal(signal.SIGCONT)
        ringkv.stop_all()
        ringkv_nosync.stop_all()
        gf.stop()
        gn.stop()
        shutil.rmtree(work, ignore_errors=True)


def quiesce(pids, limit=180, window=3.0):
    """Waits until `pids` use under 5% of a core over `window` seconds (at most `limit`);
    returns the seconds waited."""
    start = time.time()
    while time.time() - start < limit:
        before = cpu_seconds(pids)
        time.sleep(window)
        if (cpu_seconds(pids) - before) / window < 0.05:
            break
    return time.time() - start


def summarize(rows):
    med = lambda wl, cfg, k: statistics.median(r[k] for r in rows
                                               if r["workload"] == wl and r["config"] == cfg)
    print("\nmedians over the rounds; ratios ringkv / Garage (goal: ops >= 10, CPU <= 0.1, "
          "p99 lower)")
    pairs = [("ringkv-3node", "garage-fsync"), ("ringkv-3node", "garage-nofsync"),
             ("ringkv-nosync", "garage-nofsync")]
    for wl in ("A", "B", "C"):
        for mine, g in pairs:
            rk = {k: med(wl, mine, k) for k in ("ops", "p99", "cpu")}
            gk = {k: med(wl, g, k) for k in ("ops", "p99", "cpu")}
            ops, cpu = rk["ops"] / max(gk["ops"], 1e-9), rk["cpu"] / max(gk["cpu"], 1e-9)
            ok = ops >= 10 and cpu <= 0.1 and rk["p99"] < gk["p99"]
            print(f"  {wl} {mine:<13} vs {g:<15} ops x{ops:6.1f}  cpu x{cpu:6.3f}  p99 "
                  f"{rk['p99']} vs {gk['p99']} us  {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
