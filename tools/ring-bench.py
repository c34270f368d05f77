#!/usr/bin/env python3
"""What a ring change costs: a 4th node joining a loaded 3-node cluster (N=3, R=W=2).

usage: tools/ring-bench.py BIN_DIR OUT_DIR [--records 100000] [--duration 20] [--rounds 2]

Per round, on a fresh cluster c1..c3 loaded with RECORDS keys (100 B values):
  1. idle join: c4 (started with --auto-join false) is joined by `kvctl cluster join` +
     `commit` with no foreground traffic; the time from commit to the switch, and c4's
     transfer.keys_received / exchange_bytes, give the transfer rate the budgets allow when
     the machine is free. c4 then leaves again (the leave's transfers are timed too).
  2. control: workload A against c1..c3, closed loop 8 x 16, DURATION seconds.
  3. join under load: c5 is joined by commit at the start of the same run; throughput and p99
     against the control, and how much of its transfer c5 received during the run (the CPU
     yield slows transfers to a trickle on a saturated machine).
Writes JSON per run and summary.json into OUT_DIR and prints a table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import HEADER, Cluster, kvbench, measured, row  # noqa: E402


def admin(cl, i, *args):
    r = subprocess.run([f"{cl.bin}/kvctl", "--addr", cl.addr(i), "--json", "--timeout-ms",
                        "20000", "cluster", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ring-bench: kvctl cluster {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def metric(cl, i, name):
    st = cl.kvctl(i, "status")
    return (st or {}).get("metrics", {}).get(name, 0)


def wait_known(cl, node_id):
    for _ in range(300):
        st = admin(cl, 1, "status")
        for m in st["status"]["members"]:
            if m["node"] == node_id and m["alive"] and m["role"] == "joining":
                return
        time.sleep(0.1)
    sys.exit(f"ring-bench: {node_id} never seen as a joining member")


def wait_switch(cl, timeout=600):
    """Seconds until the layout has no transition."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = admin(cl, 1, "status")
        if st["status"]["layout"]["next"] is None:
            return time.monotonic() - t0
        time.sleep(0.2)
    sys.exit("ring-bench: the transition did not finish")


def wait_owners(cl, count, timeout=60):
    """Until the layout has `count` owners and no transition (a new cluster forms by joins)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = admin(cl, 1, "status")["status"]["layout"]
        if st["next"] is None and len(st["current"]) == count:
            return
        time.sleep(0.2)
    sys.exit(f"ring-bench: the cluster did not settle on {count} owners")


def change(cl, *stage):
    admin(cl, 1, *stage)
    return admin(cl, 1, "commit")


def round_(args, n):
    work = tempfile.mkdtemp(prefix="ringkv-ringbench.")
    cl = Cluster(args.bin, work, 41379)
    out = args.out
    res = {"round": n}
    try:
        for i in (1, 2, 3):
            cl.start(i)
        for i in (1, 2, 3):
            cl.wait_ready(i)
        wait_owners(cl, 3)
        fg = ["--workload", "a", "--records", str(args.records), "--value-size", "100",
              "--connections", "8", "--depth", "16"]
        kvbench(args.bin, [cl.addr(i) for i in (1, 2, 3)], out, f"r{n}-load",
                fg + ["--duration", "0.01"])
        # 1. idle join and leave of c4.
        cl.start(4, ["--auto-join", "false"])
        cl.wait_ready(4)
        wait_known(cl, "c4")
        change(cl, "join", "c4")
        secs = wait_switch(cl)
        keys = metric(cl, 4, "transfer.keys_received")
        wire = metric(cl, 4, "transfer.exchange_bytes")
        res["idle_join"] = {"seconds": secs, "keys": keys, "bytes": wire,
                            "keys_per_s": keys / secs, "mb_per_s": wire / secs / 1e6}
        print(f"r{n} idle join of c4: {keys} keys, {wire / 1e6:.1f} MB in {secs:.1f} s "
              f"({keys / secs:.0f} keys/s, {wire / secs / 1e6:.2f} MB/s)", flush=True)
        change(cl, "leave", "c4")
        secs = wait_switch(cl)
        res["idle_leave_seconds"] = secs
        print(f"r{n} leave of c4: switched in {secs:.1f} s", flush=True)
        time.sleep(8)  # the old owners hand their copies over
        cl.stop(4)
        # 2. control, 3. join of c5 under the same load.
        cl.start(5, ["--auto-join", "false"])
        cl.wait_ready(5)
        wait_known(cl, "c5")
        run = fg + ["--no-load", "--duration", str(args.duration)]
        addrs = [cl.addr(i) for i in (1, 2, 3)]
        res["control"] = measured(args.bin, cl, addrs, out, f"r{n}-control", run)
        print(row(f"r{n}-control", res["control"]), flush=True)
        admin(cl, 1, "join", "c5")
        t0 = time.monotonic()
        admin(cl, 1, "commit")
        res["join"] = measured(args.bin, cl, addrs, out, f"r{n}-join", run)
        during = metric(cl, 5, "transfer.keys_received")
        print(row(f"r{n}-join", res["join"]) + f"  c5 received {during} keys during the run",
              flush=True)
        wait_switch(cl)
        secs = time.monotonic() - t0
        total = metric(cl, 5, "transfer.keys_received")
        res["loaded_join"] = {"keys_during_run": during, "keys_total": total,
                              "seconds_to_switch": secs}
        print(f"r{n} c5 switched {secs:.1f} s after commit; {total} keys in all", flush=True)
    finally:
        cl.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("out")
    p.add_argument("--records", type=int, default=100000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(HEADER, flush=True)
    rounds = [round_(args, n) for n in range(1, args.rounds + 1)]
    tput = [r["join"]["run"]["throughput"] / r["control"]["run"]["throughput"] for r in rounds]
    p99 = [r["join"]["run"]["all"]["p99_us"] / r["control"]["run"]["all"]["p99_us"]
           for r in rounds]
    print("join under load / control: throughput " + ", ".join(f"{x:.2f}" for x in tput)
          + "; p99 " + ", ".join(f"{x:.2f}" for x in p99), flush=True)
    summary = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip(),
               "rounds": rounds}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
