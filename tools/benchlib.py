"""Helpers shared by the Python benchmark drivers (hint-bench.py, aae-bench.py, ring-bench.py)."""
import json
import os
import signal
import subprocess
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """utime + stime of the processes `pids` (fields 14 and 15 of /proc/<pid>/stat), in seconds;
    a process that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK


class Cluster:
    """Three ringkv nodes c1..c3 as in tools/bench-common.sh (client port, peer+gossip +1)."""

    def __init__(self, bin_dir, work, base, extra=(), cpus=None):
        """`cpus`: a set of CPU numbers every node (all its threads) is pinned to, or None."""
        self.bin, self.work, self.base, self.extra = bin_dir, work, base, list(extra)
        self.cpus = cpus
        self.procs = {}
        os.makedirs(work, exist_ok=True)
        self.log = open(os.path.join(work, "servers.log"), "ab")

    def addr(self, i):
        return f"127.0.0.1:{self.base + 10 * (i - 1)}"

    def start(self, i, extra=()):
        c = self.base + 10 * (i - 1)
        cmd = [f"{self.bin}/ringkv", "--node-id", f"c{i}", "--n", "3", "--r", "2", "--w", "2",
               "--listen", f"127.0.0.1:{c}", "--peer-listen", f"127.0.0.1:{c + 1}",
               "--gossip-listen", f"127.0.0.1:{c + 1}", "--data-dir", f"{self.work}/c{i}",
               "--log", "warn"] + self.extra + list(extra)
        if i > 1:
            cmd += ["--seeds", f"127.0.0.1:{self.base + 1}"]
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.procs[i] = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, preexec_fn=pin)

    def stop(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGTERM)
        p.wait(30)

    def stop_all(self):
        for i in list(self.procs):
            self.stop(i)

    def pids(self):
        return [p.pid for p in self.procs.values()]

    def kvctl(self, i, *args):
        r = subprocess.run([f"{self.bin}/kvctl", "--addr", self.addr(i), "--json", "--timeout-ms",
                            "2000", *args], capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    def wait_ready(self, i):
        wait_probe(self.bin, self.addr(i),
                   f"bench: node c{i} did not become ready; see {self.work}/servers.log")

    def wait_down(self, seen_by, node_id):
        """Until `seen_by` no longer counts `node_id` alive (so writes hint at once)."""
        for _ in range(300):
            m = self.kvctl(seen_by, "members")
            if m is not None:
                up = {x.get("node_id"): x.get("available") for x in m.get("members", [])}
                if up.get(node_id) is False:
                    return
            time.sleep(0.1)
        sys.exit(f"bench: c{seen_by} still sees {node_id} alive")

    def pending_hints(self, target):
        h = self.kvctl(1, "hints")
        if h is None:
            return None
        return sum(t.get("keys", 0) for holder in h["holders"] for t in holder["targets"]
                   if t.get("target") == target)


def wait_probe(bin_dir, addr, failure, target="ringkv", env=None, limit=30.0, timeout_ms=1000,
               pause=0.1):
    """Until one kvbench write + read through `addr` succeeds (at most `limit` seconds, then
    exits with `failure`); `env`: extra environment (e.g. a K2V access key)."""
    cmd = [f"{bin_dir}/kvbench", "--target", target, "--addr", addr, "--records", "1", "--ops",
           "1", "--connections", "1", "--depth", "1", "--duration", "1", "--timeout-ms",
           str(timeout_ms), "--key-prefix", "probe", "--json"]
    start = time.time()
    while time.time() - start < limit:
        if subprocess.run(cmd, capture_output=True, env={**os.environ, **(env or {})}).returncode == 0:
            return
        time.sleep(pause)
    sys.exit(failure)


def kvbench(bin_dir, addrs, out, label, extra, target="ringkv", env=None):
    """One kvbench run (`env`: extra environment, e.g. a K2V access key); its JSON summary."""
    cmd = [f"{bin_dir}/kvbench", "--target", target, "--addr", ",".join(addrs), "--label",
           label, "--json-out", os.path.join(out, label + ".json"), "--json"] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    with open(os.path.join(out, label + ".progress"), "w") as f:
        f.write(r.stderr)  # kvbench's per-second lines: ops/s and the slowest operation
    if r.returncode > 1:
        sys.exit(f"bench: kvbench {label} could not run: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def measured(bin_dir, cluster, addrs, out, label, extra, target="ringkv", env=None):
    """One kvbench run with the servers' CPU over it: the summary, with `cpu_us_per_op`
    (load + run phases; `cluster` is anything with `pids()`)."""
    before = cpu_seconds(cluster.pids())
    s = kvbench(bin_dir, addrs, out, label, extra, target, env)
    cpu = cpu_seconds(cluster.pids()) - before
    ops = s["run"]["all"]["count"] + (s.get("load") or {}).get("all", {}).get("count", 0)
    s["cpu_us_per_op"] = cpu * 1e6 / max(ops, 1)
    with open(os.path.join(out, label + ".json"), "w") as f:
        json.dump(s, f, indent=1)
    return s


def row(label, s):
    r, a = s["run"], s["run"]["all"]
    return (f"{label:<34}{r['throughput']:>9.0f}{a['p50_us']:>8}{a['p99_us']:>9}{a['p999_us']:>9}"
            f"{r['errors']:>7}{s['cpu_us_per_op']:>9.1f}")


HEADER = f"{'run':<34}{'ops/s':>9}{'p50':>8}{'p99':>9}{'p99.9':>9}{'errors':>7}{'cpu/op':>9}"
