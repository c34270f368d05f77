#!/usr/bin/env python3
"""What an anti-entropy exchange costs, on a 3-node cluster (N=3, R=W=2) on loopback.

usage: tools/aae-bench.py BIN_DIR OUT_DIR [--records 1000000] [--differ 10]
                          [--resync-keys-per-sec 50000] [--skip-resync]
       tools/aae-bench.py BIN_DIR OUT_DIR --cost-pairs 3 [--baseline-bin OLD_BIN_DIR]
       tools/aae-bench.py BIN_DIR OUT_DIR --resync-pairs 3 --baseline-bin OLD_BIN_DIR
                          [--records 100000] [--foreground-secs 20]

1. Load RECORDS keys (100 B values) with hinted handoff off and wait until the three nodes'
   tree roots are equal.
2. Difference: stop c3, write DIFFER new keys through c1 and c2, restart c3, run
   `kvctl repair --node c3 --wait`; report c3's exchanges from its log (duration, cells,
   keys compared, payload bytes both ways) and its aae.* metric deltas.
3. Wiped replica: stop c3, delete its data dir, restart it under the same id, run
   `kvctl repair --node c3 --wait`; report the keys received and the rate (the nodes run
   with --aae-keys-per-sec RESYNC_KEYS_PER_SEC for this, the CPU yield still applies).

With --cost-pairs: only the foreground cost of anti-entropy running flat out (every 1 s)
under workload A, against anti-entropy off (cost.json).

With --resync-pairs: a wiped replica re-synced while the other two serve clients flat out.
Per run, a fresh cluster (--aae-keys-per-sec RESYNC_KEYS_PER_SEC, hinted handoff off) once its
auto-joins are done, RECORDS keys loaded, c3 wiped and restarted (a new data dir syncs from its replicas by itself), and at
once workload A (closed loop, 8 x 16, FOREGROUND_SECS) through c1 and c2 only; reported: the
foreground's ops/s and p99, the key states c1 and c2 served c3 in that window, their
aae.serve_rests, and when the re-sync was done (the three roots equal) counted from c3's start. BIN_DIR
against --baseline-bin (the build before the serving side paced, say), alternating
(resync.json). AAE_BENCH_KEEP=1 keeps each run's data dirs and logs (their paths are printed).

Writes summary.json into OUT_DIR.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import cpu_seconds, wait_probe  # noqa: E402


class Cluster:
    def __init__(self, bin_dir, work, base, extra):
        self.bin, self.work, self.base, self.extra = bin_dir, work, base, extra
        self.procs, self.logs = {}, {}

    def addr(self, i):
        return f"127.0.0.1:{self.base + 10 * (i - 1)}"

    def start(self, i):
        c = self.base + 10 * (i - 1)
        log = os.path.join(self.work, f"c{i}.log")
        cmd = [f"{self.bin}/ringkv", "--node-id", f"c{i}", "--n", "3", "--r", "2", "--w", "2",
               "--listen", f"127.0.0.1:{c}", "--peer-listen", f"127.0.0.1:{c + 1}",
               "--gossip-listen", f"127.0.0.1:{c + 1}", "--data-dir", f"{self.work}/c{i}",
               "--log", "info"] + self.extra
        if i > 1:
            cmd += ["--seeds", f"127.0.0.1:{self.base + 1}"]
        self.logs[i] = log
        self.procs[i] = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def stop(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGTERM)
        p.wait(60)

    def stop_all(self):
        for i in list(self.procs):
            self.stop(i)

    def kvctl(self, i, *args):
        r = subprocess.run([f"{self.bin}/kvctl", "--addr", self.addr(i), "--json", *args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kvctl {args} on c{i}: {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def status(self, i):
        return self.kvctl(i, "status")

    def metric(self, i, name):
        return self.status(i)["metrics"].get(name, 0)

    def root(self, i):
        return self.status(i)["info"].get("aae.tree_root")

    def wait_ready(self, i):
        # A write (W=2) and a read through c{i}: it sees a peer. (A lone R=1 read, which this
        # waited for before, passed on a node that saw no peer yet, and the load then failed.)
        wait_probe(self.bin, self.addr(i), f"aae-bench: c{i} did not become ready; see {self.logs[i]}",
                   limit=60.0)


def exchanges_in_log(path, since):
    """The 'anti-entropy exchange repaired keys' lines of a log after byte offset `since`."""
    out = []
    with open(path, errors="replace") as f:
        f.seek(since)
        for line in f:
            if "anti-entropy exchange repaired keys" not in line:
                continue
            fields = dict(re.findall(r"(\w+)=([\w.\"-]+)", line))
            out.append({k: fields.get(k) for k in
                        ("peer", "ms", "cells", "rounds", "keys_compared", "wire_bytes", "sent",
                         "received")})
    return out


def cost(args):
    """Workload A (closed loop, 8 x 16, 15 s) with anti-entropy cycling flat out (interval 1 s)
    against anti-entropy off, fresh 3-node clusters, `pairs` pairs in alternating order."""
    rows = []
    on, off = ("new", "baseline") if args.baseline_bin else ("aae-1s", "aae-off")
    for pair in range(args.cost_pairs):
        modes = [on, off] if pair % 2 == 0 else [off, on]
        for mode in modes:
            work = tempfile.mkdtemp(prefix="ringkv-aaecost.")
            extra = (["--aae-interval-secs", "1"] if mode == "aae-1s"
                     else ["--anti-entropy", "false"] if mode == "aae-off" else [])
            bin_dir = args.baseline_bin if mode == "baseline" else args.bin
            cl = Cluster(bin_dir, work, 49379, extra)
            try:
                for i in (1, 2, 3):
                    cl.start(i)
                for i in (1, 2, 3):
                    cl.wait_ready(i)
                addrs = ",".join(cl.addr(i) for i in (1, 2, 3))
                before = cpu_seconds([p.pid for p in cl.procs.values()])
                r = subprocess.run([f"{args.bin}/kvbench", "--target", "ringkv", "--addr", addrs,
                                    "--workload", "a", "--records", "20000", "--value-size",
                                    "100", "--connections", "8", "--depth", "16", "--duration",
                                    "15", "--json"], capture_output=True, text=True)
                s = json.loads(r.stdout)
                cpu = cpu_seconds([p.pid for p in cl.procs.values()]) - before
                ops = s["run"]["all"]["count"] + s["load"]["all"]["count"]
                m = [cl.status(i)["metrics"] for i in (1, 2, 3)]
                row = {"pair": pair, "mode": mode, "ops_s": s["run"]["throughput"],
                       "cpu_us_per_op": round(cpu * 1e6 / max(ops, 1), 1),
                       "p99_us": s["run"]["all"]["p99_us"],
                       "exchanges": sum(x.get("aae.exchanges", 0) for x in m),
                       "keys_repaired": sum(x.get("aae.keys_repaired_sent", 0)
                                            + x.get("aae.keys_repaired_received", 0) for x in m),
                       "exchange_bytes": sum(x.get("aae.exchange_bytes", 0) for x in m),
                       "keys_compared": sum(x.get("aae.keys_compared", 0) for x in m),
                       "cells_compared": sum(x.get("aae.cells_compared", 0) for x in m)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                cl.stop_all()
                shutil.rmtree(work, ignore_errors=True)
    gm = lambda xs: (lambda p: p ** (1 / len(xs)))(__import__("math").prod(xs))
    a = [r for r in rows if r["mode"] == on]
    b = [r for r in rows if r["mode"] == off]
    ratio = gm([r["ops_s"] for r in a]) / gm([r["ops_s"] for r in b])
    p99 = gm([r["p99_us"] for r in a]) / gm([r["p99_us"] for r in b])
    cpu = gm([r["cpu_us_per_op"] for r in a]) / gm([r["cpu_us_per_op"] for r in b])
    print(f"{on} / {off}: throughput {ratio:.3f}, p99 {p99:.2f}, cpu/op {cpu:.2f}", flush=True)
    return {"rows": rows, "throughput_ratio": ratio, "p99_ratio": p99, "cpu_ratio": cpu}


def load(bin_dir, cl, records):
    """RECORDS keys of 100 B through all three nodes; exits on a failed write."""
    r = subprocess.run([f"{bin_dir}/kvbench", "--target", "ringkv", "--addr",
                        ",".join(cl.addr(i) for i in (1, 2, 3)), "--workload", "w",
                        "--records", str(records), "--value-size", "100",
                        "--connections", "8", "--depth", "16", "--duration", "0.01",
                        "--json"], capture_output=True, text=True)
    if r.returncode > 1:
        sys.exit(f"aae-bench: load failed: {r.stderr[-2000:]}")
    loaded = json.loads(r.stdout)["load"]
    if loaded["errors"]:
        sys.exit(f"aae-bench: {loaded['errors']} of the load's writes failed: "
                 f"{loaded['first_errors']}")


def wait_roots_equal(cl):
    for _ in range(600):
        roots = {cl.root(i) for i in (1, 2, 3)}
        if len(roots) == 1:
            return
        time.sleep(0.5)
    sys.exit(f"aae-bench: roots never equal after the load: {roots}")


def wait_settled(cl):
    """Until the auto-joins are done: three owners, no running change, and every member on
    that layout (a node stopped in the middle of them measures the ring change, not this)."""
    for _ in range(240):
        st = cl.kvctl(1, "cluster", "status")["status"]
        layout = st["layout"]
        if (layout["next"] is None and len(layout["current"]) == 3
                and all(m["layout_version"] == layout["version"] for m in st["members"])):
            return
        time.sleep(0.5)
    sys.exit(f"aae-bench: the ring never settled: {st}")


def resync_under_load(args):
    """A wiped c3 re-synced while c1 and c2 serve workload A flat out: BIN_DIR against
    --baseline-bin, `resync_pairs` pairs in alternating order (kvctl and kvbench of BIN_DIR)."""
    rows = []
    for pair in range(args.resync_pairs):
        modes = ["new", "baseline"] if pair % 2 == 0 else ["baseline", "new"]
        for mode in modes:
            work = tempfile.mkdtemp(prefix="ringkv-aaeresync.")
            extra = ["--hinted-handoff", "false", "--aae-interval-secs", "86400",
                     "--aae-keys-per-sec", str(args.resync_keys_per_sec)]
            cl = Cluster(args.baseline_bin if mode == "baseline" else args.bin, work, 47379,
                         extra)
            try:
                for i in (1, 2, 3):
                    cl.start(i)
                for i in (1, 2, 3):
                    cl.wait_ready(i)
                wait_settled(cl)
                load(args.bin, cl, args.records)
                wait_roots_equal(cl)
                cl.stop(3)
                shutil.rmtree(os.path.join(work, "c3"))
                rests = sum(cl.metric(i, "aae.serve_rests") for i in (1, 2))
                # c3's own counters move only when an exchange ends: its progress is what c1
                # and c2 served it.
                served = sum(cl.metric(i, "aae.states_served") for i in (1, 2))
                # A node started on a new data dir syncs from its replicas by itself at once
                # (docs/architecture.md): the window starts with its start, and its counters
                # with its process.
                t0 = time.monotonic()
                cl.start(3)
                r = subprocess.run([f"{args.bin}/kvbench", "--target", "ringkv", "--addr",
                                    f"{cl.addr(1)},{cl.addr(2)}", "--workload", "a",
                                    "--no-load", "--records", str(args.records),
                                    "--value-size", "100", "--connections", "8", "--depth",
                                    "16", "--duration", str(args.foreground_secs), "--json"],
                                   capture_output=True, text=True)
                s = json.loads(r.stdout)
                row = {"pair": pair, "mode": mode, "ops_s": s["run"]["throughput"],
                       "p99_us": s["run"]["all"]["p99_us"],
                       "errors": s["run"]["errors"],
                       "first_errors": s["run"].get("first_errors", [])[:3],
                       "keys_resynced": sum(cl.metric(i, "aae.states_served") for i in (1, 2))
                       - served,
                       "serve_rests": sum(cl.metric(i, "aae.serve_rests") for i in (1, 2))
                       - rests}
                # Then idle: how long the whole re-sync took from c3's start.
                wait_roots_equal(cl)
                row["resync_done_s"] = round(time.monotonic() - t0, 1)
                row["keys_resynced_in_all"] = cl.metric(3, "aae.keys_repaired_received")
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                cl.stop_all()
                if os.environ.get("AAE_BENCH_KEEP"):
                    print(f"kept {work}", flush=True)
                else:
                    shutil.rmtree(work, ignore_errors=True)
    gm = lambda xs: (lambda p: p ** (1 / len(xs)))(__import__("math").prod(xs))
    a = [r for r in rows if r["mode"] == "new"]
    b = [r for r in rows if r["mode"] == "baseline"]
    out = {"rows": rows,
           "throughput_ratio": gm([r["ops_s"] for r in a]) / gm([r["ops_s"] for r in b]),
           "p99_ratio": gm([r["p99_us"] for r in a]) / gm([r["p99_us"] for r in b]),
           "resync_ratio": sum(r["keys_resynced"] for r in a)
           / max(1, sum(r["keys_resynced"] for r in b))}
    print(f"new / baseline: foreground throughput {out['throughput_ratio']:.3f}, p99 "
          f"{out['p99_ratio']:.2f}, keys re-synced meanwhile {out['resync_ratio']:.2f}",
          flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("out")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--differ", type=int, default=10)
    p.add_argument("--resync-keys-per-sec", type=int, default=50_000)
    p.add_argument("--skip-resync", action="store_true")
    p.add_argument("--cost-pairs", type=int, default=0,
                   help="only measure the foreground cost of anti-entropy, in this many pairs")
    p.add_argument("--baseline-bin",
                   help="with --cost-pairs: compare BIN_DIR (defaults) with this build instead; "
                        "with --resync-pairs: the build to compare with")
    p.add_argument("--resync-pairs", type=int, default=0,
                   help="only measure a wiped replica's re-sync under a foreground load")
    p.add_argument("--foreground-secs", type=int, default=20)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.resync_pairs:
        if not args.baseline_bin:
            sys.exit("aae-bench: --resync-pairs needs --baseline-bin")
        with open(os.path.join(args.out, "resync.json"), "w") as f:
            json.dump(resync_under_load(args), f, indent=1)
        return
    if args.cost_pairs:
        with open(os.path.join(args.out, "cost.json"), "w") as f:
            json.dump(cost(args), f, indent=1)
        return
    work = tempfile.mkdtemp(prefix="ringkv-aaebench.")
    extra = ["--hinted-handoff", "false", "--aae-interval-secs", "86400",
             "--aae-keys-per-sec", str(args.resync_keys_per_sec)]
    cl = Cluster(args.bin, work, 48379, extra)
    summary = {"records": args.records, "differ": args.differ}
    try:
        for i in (1, 2, 3):
            cl.start(i)
        for i in (1, 2, 3):
            cl.wait_ready(i)
        t0 = time.monotonic()
        load(args.bin, cl, args.records)
        summary["load_s"] = round(time.monotonic() - t0, 1)
        print(f"loaded {args.records} keys in {summary['load_s']} s", flush=True)
        wait_roots_equal(cl)
        print("roots equal", flush=True)

        # Difference of DIFFER keys.
        cl.stop(3)
        for k in range(args.differ):
            # Right after c3 left, c1 may briefly not count c2 (a suspicion under the load's
            # aftermath): a refused write changed nothing, so it is tried again.
            for attempt in range(100):
                try:
                    cl.kvctl(1 + k % 2, "put", "--blind", f"diff-{k}", "x" * 100)
                    break
                except RuntimeError:
                    if attempt == 99:
                        raise
                    time.sleep(0.1)
        offset = os.path.getsize(cl.logs[3])
        cl.start(3)
        cl.wait_ready(3)
        before = cl.status(3)["metrics"]
        t0 = time.monotonic()
        cl.kvctl(1, "repair", "--node", "c3", "--wait")
        wall = time.monotonic() - t0
        after = cl.status(3)["metrics"]
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("aae.")}
        ex = exchanges_in_log(cl.logs[3], offset)
        summary["difference"] = {"repair_wall_s": round(wall, 2), "metrics": delta,
                                 "exchanges": ex,
                                 "roots_equal": len({cl.root(i) for i in (1, 2, 3)}) == 1}
        print(json.dumps(summary["difference"], indent=1), flush=True)

        if not args.skip_resync:
            cl.stop(3)
            shutil.rmtree(os.path.join(work, "c3"))
            offset = os.path.getsize(cl.logs[3])
            cl.start(3)
            cl.wait_ready(3)
            t0 = time.monotonic()
            cl.kvctl(1, "repair", "--node", "c3", "--wait")
            wall = time.monotonic() - t0
            m = cl.status(3)["metrics"]
            got = m.get("aae.keys_repaired_received", 0)
            summary["resync"] = {"wall_s": round(wall, 1), "keys_received": got,
                                 "keys_per_s": round(got / wall),
                                 "exchanges": exchanges_in_log(cl.logs[3], offset),
                                 "roots_equal": len({cl.root(i) for i in (1, 2, 3)}) == 1}
            print(json.dumps(summary["resync"], indent=1), flush=True)
    finally:
        cl.stop_all()
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
