#!/usr/bin/env python3
"""What hinted handoff costs, measured on a 3-node cluster (N=3, R=W=2) on loopback.

usage: tools/hint-bench.py BIN_DIR OUT_DIR [--pairs 3] [--records 20000] [--backlog 100000]
                           [--duration 15] [--cycles 2]

Part 1, the cost of hinting: workload A (closed loop, 8 x 16) against nodes c1 and c2 with
all three nodes up; with c3 stopped (each write leaves a hint for c3 on its coordinator,
in the write's own batch); and with c3 stopped and --hinted-handoff false (the same two
replicas, no hint): fresh clusters, the order rotating per round.

Part 2, the cost of replay, on one cluster: cycles of two kinds, alternating. Replay: c3
stopped, BACKLOG new keys written through c1 and c2 (hints for c3), c3 restarted, and at
once workload A against c3 alone while the backlog replays into it; the pending hints
are sampled every 0.5 s until they reach 0. Control: the same BACKLOG keys written with
c3 up (replicated, no hints), then c3 stopped and restarted and the same run: the same
restart and the same data volume, without replay. Closed loop first (throughput), then
open loop at 25% and 50% of the first control's throughput (p99). The backlog's keys ("b<n>-...")
are not the foreground's ("user..."): replay and read repair do not overlap.

Server CPU per operation = utime + stime of the live servers over a run / its operations.
Writes JSON per run and summary.json into OUT_DIR and prints a table.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import HEADER, Cluster, kvbench, measured, row  # noqa: E402


def part1(args, out):
    results = []
    common = ["--workload", "a", "--records", str(args.records), "--value-size", "100",
              "--connections", "8", "--depth", "16"]
    for pair in range(args.pairs):
        modes = ["all-up", "c3-down", "c3-down-nohints"]
        for mode in modes[pair % 3:] + modes[:pair % 3]:
            work = tempfile.mkdtemp(prefix="ringkv-hintbench.")
            extra = ["--hinted-handoff", "false"] if mode == "c3-down-nohints" else []
            cl = Cluster(args.bin, work, 38379, extra)
            try:
                for i in (1, 2, 3):
                    cl.start(i)
                for i in (1, 2, 3):
                    cl.wait_ready(i)
                if mode != "all-up":
                    cl.stop(3)
                    cl.wait_down(1, "c3")
                    cl.wait_down(2, "c3")
                addrs = [cl.addr(1), cl.addr(2)]
                kvbench(args.bin, addrs, out, f"p{pair}-{mode}-load",
                        common + ["--duration", "0.01"])
                label = f"p{pair}-{mode}"
                s = measured(args.bin, cl, addrs, out, label,
                             common + ["--no-load", "--duration", str(args.duration)])
                if mode == "c3-down":
                    s["hints_after"] = cl.pending_hints("c3")
                print(row(label, s) + (f"  hints for c3: {s.get('hints_after')}"
                                       if mode == "c3-down" else ""), flush=True)
                results.append({"pair": pair, "mode": mode, "summary": s})
            finally:
                cl.stop_all()
                shutil.rmtree(work, ignore_errors=True)
    gm = lambda xs: (lambda p: p ** (1 / len(xs)))(__import__("math").prod(xs))
    by = lambda mode, f: gm([f(r["summary"]) for r in results if r["mode"] == mode])
    for a, b in (("c3-down", "c3-down-nohints"), ("c3-down", "all-up")):
        print(f"{a} / {b}: throughput {by(a, lambda s: s['run']['throughput']) / by(b, lambda s: s['run']['throughput']):.2f},"
              f" p99 {by(a, lambda s: s['run']['all']['p99_us']) / by(b, lambda s: s['run']['all']['p99_us']):.2f},"
              f" cpu/op {by(a, lambda s: s['cpu_us_per_op']) / by(b, lambda s: s['cpu_us_per_op']):.2f}", flush=True)
    return results


def part2(args, out):
    """Replay cost: per load mode (closed loop, then open loop at half the first closed-loop
    control's throughput), `cycles` pairs of control and replay cycles, order alternating."""
    work = tempfile.mkdtemp(prefix="ringkv-replaybench.")
    cl = Cluster(args.bin, work, 39379, args.server_arg)
    cycles = []
    try:
        for i in (1, 2, 3):
            cl.start(i)
        for i in (1, 2, 3):
            cl.wait_ready(i)
        fg = ["--workload", "a", "--records", str(args.records), "--value-size", "100",
              "--connections", "8", "--depth", "16", "--duration", str(args.duration)]
        kvbench(args.bin, [cl.addr(1), cl.addr(2), cl.addr(3)], out, "r-load",
                fg[:-2] + ["--duration", "0.01"])
        n = 0
        for loop in loops(args):
            mode = ["--no-load"]
            if loop != "closed":
                peak = next(c["run"]["run"]["throughput"] for c in cycles if c["kind"] == "control")
                mode += ["--rate", str(int(peak * int(loop[4:]) / 100))]
            for k in range(args.cycles * 2):
                kind = ("control", "replay")[(k + k // 2) % 2]  # control, replay, replay, control...
                n += 1
                cycles.append(replay_cycle(args, cl, out, n, loop, kind, fg + mode))
    finally:
        cl.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for loop in loops(args):
        runs = {kind: [c for c in cycles if c["loop"] == loop and c["kind"] == kind]
                for kind in ("control", "replay")}
        gm = lambda xs: (lambda p: p ** (1 / len(xs)))(__import__("math").prod(xs))
        tput = gm([r["run"]["run"]["throughput"] for r in runs["replay"]]) / gm(
            [r["run"]["run"]["throughput"] for r in runs["control"]])
        p99 = gm([r["run"]["run"]["all"]["p99_us"] for r in runs["replay"]]) / gm(
            [r["run"]["run"]["all"]["p99_us"] for r in runs["control"]])
        rates = [r["replay_keys_per_s"] for r in runs["replay"] if r["replay_keys_per_s"]]
        print(f"{loop} loop: replay/control throughput {tput:.2f}, p99 {p99:.2f};"
              f" replay rate {', '.join(f'{x:.0f}' for x in rates)} keys/s", flush=True)
    return cycles


def loops(args):
    return ["closed"] + [f"open{p}" for p in args.open_pcts.split(",") if p]


def replay_cycle(args, cl, out, n, loop, kind, fg):
    """c3 stopped, BACKLOG keys written (replay: through c1 and c2 while c3 is down, so they
    become hints; control: before c3 stops, replicated normally), c3 restarted and at once the
    foreground run against c3 alone. Replay cycles then wait for the hints to drain."""
    backlog = ["--workload", "w", "--records", str(args.backlog), "--key-prefix", f"b{n}-",
               "--value-size", "100", "--connections", "8", "--depth", "16", "--duration",
               "0.01"]
    if kind == "control":
        kvbench(args.bin, [cl.addr(1), cl.addr(2)], out, f"c{n}-backlog", backlog)
    cl.stop(3)
    cl.wait_down(1, "c3")
    cl.wait_down(2, "c3")
    hints = None
    if kind == "replay":
        kvbench(args.bin, [cl.addr(1), cl.addr(2)], out, f"c{n}-backlog", backlog)
        hints = cl.pending_hints("c3")
    cl.start(3)
    cl.wait_ready(3)
    sampler = None
    if kind == "replay":
        sampler = subprocess.Popen([sys.executable, __file__, "--sample", cl.addr(1), args.bin,
                                    os.path.join(out, f"c{n}-pending.json"), cl.addr(3)])
    label = f"c{n}-{loop}-{kind}"
    run = measured(args.bin, cl, [cl.addr(3)], out, label, fg)
    drained = rate = samples = None
    if sampler is not None:
        sampler.wait()
        with open(os.path.join(out, f"c{n}-pending.json")) as f:
            samples = json.load(f)
        drained = next((s[0] for s in samples if s[1] == 0), None)
        rate = hints / drained if drained and hints else None
    print(row(label, run) + (f"  {hints} hints drained in {drained} s" if hints else ""),
          flush=True)
    return {"n": n, "loop": loop, "kind": kind, "run": run, "hints": hints,
            "drained_s": drained, "replay_keys_per_s": rate, "pending_samples": samples}


def sample(addr, bin_dir, path, target_addr):
    """Child process: pending hints for c3 (as seen from addr) every 0.5 s until 0, max 300 s,
    with c3's replay pace (percent of its budget granted)."""
    t0, samples = time.monotonic(), []
    while time.monotonic() - t0 < 300:
        r = subprocess.run([f"{bin_dir}/kvctl", "--addr", addr, "--json", "hints"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            h = json.loads(r.stdout)
            n = sum(t.get("keys", 0) for holder in h["holders"] for t in holder["targets"]
                    if t.get("target") == "c3")
            st = subprocess.run([f"{bin_dir}/kvctl", "--addr", target_addr, "--json", "status"],
                                capture_output=True, text=True)
            # The granted share (a ratio; `kvctl status` shows ratios in thousandths), as percent.
            milli = (json.loads(st.stdout)["metrics"].get("hints.replay_pace_ratio")
                     if st.returncode == 0 else None)
            pace = milli / 10 if milli is not None else None
            samples.append((round(time.monotonic() - t0, 2), n, pace))
            if n == 0:
                break
        time.sleep(0.5)
    with open(path, "w") as f:
        json.dump(samples, f)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--sample":
        return sample(*sys.argv[2:6])
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("out")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--backlog", type=int, default=100000)
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--open-pcts", default="25,50",
                   help="open-loop rates, percent of the first closed-loop control's throughput")
    p.add_argument("--only", choices=["hinting", "replay"])
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for every ringkv node in the replay part (repeat)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()}
    print(HEADER, flush=True)
    if args.only != "replay":
        summary["hinting"] = part1(args, args.out)
    if args.only != "hinting":
        summary["replay"] = part2(args, args.out)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
