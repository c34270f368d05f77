#!/usr/bin/env python3
"""Overload benchmark (issue 18): kvbench in open loop beyond the closed-loop peak.

Three nodes as in tools/bench-common.sh (N=3, R=W=2, sync group), 100 000 records of 100 B,
workload A. Per round: the closed-loop peak (10 s), then 10 s in open loop at 0.5x, 1.0x,
1.5x and 2.0x that peak. For each: goodput (ok ops/s), shed/s (refused Overloaded), errors,
p50/p99 of the admitted requests (latency from each request's intended start), the servers'
CPU per op and their peak resident memory. Each latency p99 also shows counted from when the
generator sent the request ("from send") and how late the generator itself was (p99 of each
request's start behind its due time): the generator shares the 2 cores with the nodes, and at
2x its own delays are part of the latencies counted from the intended start. Of that delay,
"handed" is the part before kvbench's dispatcher thread handed the request to its runtime, and
"permit waits" the total time the dispatcher waited for kvbench's own limit of requests in
flight (connections x depth x 4).

usage: tools/overload-bench.py BIN_DIR OUT_DIR [--rounds 2] [--node-args "--max-requests 256"]
                                [--server-cpus 1.5] [--connections 8] [--depth 16]
                                [--kvbench-args "--threads 1"] [--pin 1:0]
Goals: at 2x, goodput >= 90% of the peak and admitted p99 <= 3x the p99 at 0.5x.

--server-cpus X puts the three nodes in a cgroup whose CPU quota is X cores (cgroup v1 `cpu`
or v2 `cpu.max`, 1 ms periods: a throttled group waits at most the rest of 1 ms; needs root), for every phase, peak included: the nodes then get
the same CPU whether the generator (same machine) dispatches 1x or 2x the requests, as when
clients run on other machines. Without it the generator's CPU, which doubles from the peak to
2x, comes out of the nodes' share of the cores.

--pin NODES:GENERATOR pins the three nodes (every thread: the affinity is set before each node
starts) to the CPU list NODES and kvbench (and this driver) to GENERATOR, e.g. `--pin 1:0`: the
nodes get one whole core in every phase and the generator never takes CPU from them, nor they
from it (shared/BENCHMARKS.md, "Pinning"). Unlike --server-cpus this also keeps each side's
scheduling latency its own: neither can preempt the other.
"""
import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Cluster, measured  # noqa: E402

RATES = [0.5, 1.0, 1.5, 2.0]


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the nodes' resident memory every 100 ms; `peak` is the largest single node's."""

    def __init__(self, pids):
        self.pids, self.peak, self.running = pids, 0, True
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while self.running:
            self.peak = max([self.peak] + [rss_bytes(p) for p in self.pids])
            time.sleep(0.1)

    def stop(self):
        self.running = False
        self.t.join()
        return self.peak


class CpuCap:
    """A cgroup capping the processes added to it at `cores` CPUs (quota per 1 ms period).

    Its weight is raised far above one thread's: the scheduler weighs a group as one entity,
    so at the default weight the three nodes together would get no more CPU than each of the
    generator's threads, and the cap would not be what binds."""

    PERIOD_US = 1_000

    def __init__(self, cores):
        quota = int(cores * self.PERIOD_US)
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v2
            root = "/sys/fs/cgroup"
            settings = {"cpu.max": f"{quota} {self.PERIOD_US}", "cpu.weight": "10000"}
        else:  # cgroup v1, `cpu` controller
            root = "/sys/fs/cgroup/cpu"
            settings = {"cpu.cfs_period_us": str(self.PERIOD_US),
                        "cpu.cfs_quota_us": str(quota), "cpu.shares": str(1024 * 64)}
        self.path = os.path.join(root, "ringkv-overload-bench")
        os.makedirs(self.path, exist_ok=True)
        for name, value in settings.items():
            self.write(name, value)

    def write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid):
        self.write("cgroup.procs", str(pid))

    def throttled_periods(self):
        """Periods in which the group used its whole quota and was paused."""
        with open(os.path.join(self.path, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "nr_throttled":
                    return int(v)
        return 0

    def close(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def parse_cpus(text):
    """A CPU list as taskset takes it ("0", "1-3", "0,2"): the set of CPU numbers."""
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise ValueError(text)
    return cpus


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--node-args", default="")
    ap.add_argument("--base-port", type=int, default=29379)
    ap.add_argument("--connections", type=int, default=8,
                    help="kvbench connections, spread round-robin over the 3 nodes")
    ap.add_argument("--depth", type=int, default=16, help="kvbench requests per client")
    ap.add_argument("--kvbench-args", default="",
                    help="more kvbench options for every phase (e.g. --threads 1)")
    ap.add_argument("--server-cpus", type=float, default=None,
                    help="cap the nodes at this many cores (a cgroup; needs root)")
    ap.add_argument("--pin", default=None, metavar="NODES:GENERATOR",
                    help="CPU lists for the nodes and for kvbench, e.g. 1:0")
    a = ap.parse_args()
    node_cpus = None
    if a.pin is not None:
        try:
            nodes, gen = (parse_cpus(x) for x in a.pin.split(":"))
        except ValueError:
            sys.exit(f"overload-bench: --pin wants NODES:GENERATOR CPU lists (e.g. 1:0 or 2-3:0-1), got {a.pin!r}")
        node_cpus = nodes
        os.sched_setaffinity(0, gen)  # kvbench, started by this process, inherits it
        print(f"nodes pinned to CPUs {sorted(nodes)}, generator to {sorted(gen)}", flush=True)
    cap = None
    if a.server_cpus is not None:
        try:
            cap = CpuCap(a.server_cpus)
        except OSError as e:
            sys.exit(f"overload-bench: cannot create a cgroup for --server-cpus: {e} "
                     "(needs root and the cgroup cpu controller)")
        print(f"nodes capped at {a.server_cpus} cores ({cap.path})", flush=True)
    os.makedirs(a.out, exist_ok=True)
    common = ["--workload", "a", "--records", "100000", "--value-size", "100",
              "--connections", str(a.connections), "--depth", str(a.depth), "--duration", "10"] + a.kvbench_args.split()
    rows = []
    for rnd in range(1, a.rounds + 1):
        work = tempfile.mkdtemp(prefix="ringkv-overload-")
        cluster = Cluster(a.bin, work, a.base_port, a.node_args.split(), cpus=node_cpus)
        try:
            for i in (1, 2, 3):
                cluster.start(i)
                if cap is not None:
                    cap.add(cluster.procs[i].pid)
            for i in (1, 2, 3):
                cluster.wait_ready(i)
            time.sleep(3)  # new data dirs sync with each other before they answer reads
            addrs = [cluster.addr(i) for i in (1, 2, 3)]
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            peak = measured(a.bin, cluster, addrs, a.out, f"r{rnd}-peak", common)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            peak_ops = peak["run"]["throughput"]
            # The load phase runs first in the same kvbench: CPU over load + run.
            spent = peak["run"]["duration_s"] + (peak.get("load") or {}).get("duration_s", 0)
            gen_peak = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / max(spent, 1e-9)
            print(f"round {rnd}: closed-loop peak {peak_ops:.0f} ops/s, "
                  f"p99 {peak['run']['all']['p99_us']} us, generator {gen_peak * 100:.0f}% of a core",
                  flush=True)
            for x in RATES:
                rate = int(peak_ops * x)
                watch = PeakRss(cluster.pids())
                thr0 = cap.throttled_periods() if cap else 0
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                s = measured(a.bin, cluster, addrs, a.out, f"r{rnd}-{x}x",
                             common + ["--no-load", "--rate", str(rate)])
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                # The generator shares the 2 cores: its CPU (share of one core) at each rate.
                gen = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / s["run"]["duration_s"]
                r = s["run"]
                rows.append({
                    "round": rnd, "x": x, "rate": rate, "peak": peak_ops,
                    "goodput": r["throughput"], "shed_per_s": r.get("shed", 0) / r["duration_s"],
                    "errors": r["errors"], "p50": r["all"]["p50_us"], "p99": r["all"]["p99_us"],
                    "cpu": s["cpu_us_per_op"], "rss": watch.stop(), "gen": gen,
                    "throttled": (cap.throttled_periods() - thr0) if cap else 0,
                    # The generator's own delay (p99 of how late each op began): part of the
                    # latencies, not the nodes' doing.
                    "late_p99": (r.get("late") or {}).get("p99_us", 0),
                    # The part of it before the dispatcher thread handed the op to the
                    # runtime, and its total wait for the generator's in-flight limit.
                    "handed_p99": (r.get("dispatch_late") or {}).get("p99_us", 0),
                    "permit_wait_s": r.get("permit_wait_s") or 0.0,
                    # The admitted requests' p99 counted from when the generator sent them.
                    "sent_p99": (r.get("from_send") or {}).get("p99_us", 0),
                })
                row = rows[-1]
                print(f"  {x:>4}x {rate:>7}/s  goodput {row['goodput']:>8.0f} "
                      f"({row['goodput'] / peak_ops:5.2f} of peak)  shed {row['shed_per_s']:>7.0f}/s  "
                      f"errors {row['errors']:>5}  p50 {row['p50']:>7}  p99 {row['p99']:>8} us  "
                      f"(from send {row['sent_p99']:>7}; generator late p99 {row['late_p99']:>7}, "
                      f"handed {row['handed_p99']:>7}, permit waits {row['permit_wait_s']:.2f} s)  "
                      f"cpu {row['cpu']:6.1f} us/op  rss {row['rss'] >> 20} MiB  "
                      f"generator {row['gen'] * 100:4.0f}% of a core"
                      + (f"  throttled {row['throttled']} periods" if cap else ""), flush=True)
        finally:
            cluster.stop_all()
            shutil.rmtree(work, ignore_errors=True)
    if cap is not None:
        cap.close()
    print("\nsummary (per round): goodput at 2x / peak, p99 at 2x / p99 at 0.5x")
    for rnd in range(1, a.rounds + 1):
        by = {r["x"]: r for r in rows if r["round"] == rnd}
        if 2.0 in by and 0.5 in by:
            g = by[2.0]["goodput"] / by[2.0]["peak"]
            p = by[2.0]["p99"] / max(by[0.5]["p99"], 1)
            ps = by[2.0]["sent_p99"] / max(by[0.5]["sent_p99"], 1)
            print(f"  round {rnd}: goodput {g:.2f} (goal >= 0.90), p99 ratio {p:.2f} (goal <= 3; "
                  f"counted from send: {ps:.2f})")


if __name__ == "__main__":
    main()
