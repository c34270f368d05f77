#!/usr/bin/env python3
"""Garage (K2V API) as a benchmark baseline: install it once, start a 3-node cluster on loopback.

Garage is the closest existing system to ringkv: leaderless, Rust, replication factor 3 with
read and write quorums of 2, causality tokens and siblings (K2V), Merkle-tree sync. Its K2V
API is what kvbench's `garage-k2v` target drives.

usage:
  tools/garage.py install                 # prints the binary's path (builds it once, ~20 min)
  tools/garage.py start WORK BASE_PORT [--fsync on|off]
      starts 3 nodes (RPC on BASE+1, +11, +21; K2V on BASE, +10, +20), applies a layout,
      creates a bucket and an access key, and prints shell assignments for `eval`
      (the caller then waits until every K2V endpoint answers, e.g. with a kvbench probe):
      garage_pids, garage_addrs, GARAGE_K2V_KEY_ID, GARAGE_K2V_SECRET (the secret is only
      printed there, for the caller's environment; never logged).

Durability: `--fsync on` sets `metadata_fsync = true` (every metadata transaction, so every
acknowledged K2V insert, is fsynced: comparable to ringkv's `--sync group`); `off` is Garage's
default (`metadata_fsync = false`: acknowledged writes can be lost on power loss, comparable
to ringkv's `--sync none`). Values of 100 B live in the metadata (LMDB), not in data blocks.

Garage does not set TCP_NODELAY on its RPC connections (Nagle can add 40 ms stalls when a
connection carries one small message at a time); the benchmarks run it as shipped, with
enough requests in flight (128) that its RPC connections are rarely idle-then-small.
"""
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

VERSION = "2.5.0"
ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ringkv-garage")
BIN = os.path.join(ROOT, "bin", "garage")
BUCKET = "kvbench"
REGION = "garage"


def install():
    """The garage binary of VERSION, built into ROOT with cargo on first use."""
    if os.path.exists(BIN):
        out = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout
        if VERSION in out:
            return BIN
    print(f"==> installing Garage {VERSION} into {ROOT} with cargo: the first build takes "
          f"about 20 minutes on 2 cores (once; later runs reuse it)", file=sys.stderr, flush=True)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target"))
    r = subprocess.run(["cargo", "install", "garage", "--version", VERSION, "--locked",
                        "--root", ROOT], env=env)
    if r.returncode != 0 or not os.path.exists(BIN):
        sys.exit(f"garage: cargo install garage {VERSION} failed (exit {r.returncode})")
    # The build folder is 2-3 GB; the binary is all that is needed.
    shutil.rmtree(os.path.join(ROOT, "target"), ignore_errors=True)
    return BIN


class GarageCluster:
    """Three Garage nodes g1..g3 on 127.0.0.1, replication factor 3 (quorums of 2)."""

    def __init__(self, binary, work, base, fsync, log=None):
        self.bin, self.work, self.base, self.fsync = binary, work, base, fsync
        self.secret = secrets.token_hex(32)
        self.procs = []
        os.makedirs(work, exist_ok=True)
        self.log = log or open(os.path.join(work, "garage.log"), "ab")

    def k2v_addr(self, i):
        return f"127.0.0.1:{self.base + 10 * (i - 1)}"

    def config(self, i):
        p = self.base + 10 * (i - 1)
        d = os.path.join(self.work, f"g{i}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "garage.toml")
        with open(path, "w") as f:
            f.write(f"""metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
metadata_fsync = {"true" if self.fsync else "false"}
data_fsync = false
replication_factor = 3
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:{p + 1}"
rpc_public_addr = "127.0.0.1:{p + 1}"
rpc_secret = "{self.secret}"
allow_world_readable_secrets = true

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{p + 2}"
root_domain = ".s3.garage.localhost"

[k2v_api]
api_bind_addr = "127.0.0.1:{p}"

[admin]
api_bind_addr = "127.0.0.1:{p + 3}"
""")
        return path

    def cli(self, i, *args):
        r = subprocess.run([self.bin, "-c", self.config_path(i), *args], capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"garage {' '.join(args)} on g{i}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def config_path(self, i):
        return os.path.join(self.work, f"g{i}", "garage.toml")

    def retry(self, what, fn, tries=100):
        err = None
        for _ in range(tries):
            try:
                return fn()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                err = e
                time.sleep(0.2)
        sys.exit(f"garage: {what} failed: {err}; see {self.work}/garage.log")

    def start(self):
        for i in (1, 2, 3):
            cfg = self.config(i)
            env = dict(os.environ, RUST_LOG="warn")
            self.procs.append(subprocess.Popen([self.bin, "-c", cfg, "server"], stdout=self.log,
                                               stderr=self.log, env=env))
        ids = [self.retry(f"node id of g{i}", lambda i=i: self.cli(i, "node", "id", "-q").strip())
               for i in (1, 2, 3)]
        for node in ids[1:]:
            self.retry(f"connect {node}", lambda n=node: self.cli(1, "node", "connect", n))
        for node in ids:
            short = node.split("@")[0]
            self.retry(f"layout assign {short[:16]}",
                       lambda s=short: self.cli(1, "layout", "assign", "-z", "dc1", "-c", "1G", s))
        self.retry("layout apply", lambda: self.cli(1, "layout", "apply", "--version", "1"))
        key = self.retry("key create", lambda: self.cli(1, "key", "create", "kvbench-key"))
        key_id = re.search(r"Key ID:\s*(\S+)", key)
        secret = re.search(r"Secret key:\s*(\S+)", key)
        if not key_id or not secret:
            sys.exit("garage: could not read the key created by `garage key create` "
                     "(its output format changed?)")
        self.key_id, self.key_secret = key_id.group(1), secret.group(1)
        self.retry("bucket create", lambda: self.cli(1, "bucket", "create", BUCKET))
        self.retry("bucket allow", lambda: self.cli(1, "bucket", "allow", "--read", "--write",
                                                    BUCKET, "--key", self.key_id))
        return self

    def pids(self):
        return [p.pid for p in self.procs]

    def addrs(self):
        return ",".join(self.k2v_addr(i) for i in (1, 2, 3))

    def env(self):
        return {"GARAGE_K2V_KEY_ID": self.key_id, "GARAGE_K2V_SECRET": self.key_secret}

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "install":
        print(install())
        return
    if len(sys.argv) >= 4 and sys.argv[1] == "start":
        work, base = sys.argv[2], int(sys.argv[3])
        fsync = "on"
        if "--fsync" in sys.argv[4:]:
            i = sys.argv.index("--fsync")
            fsync = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
        if fsync not in ("on", "off"):
            sys.exit(f"garage: --fsync takes on or off, not {fsync!r}")
        fsync = fsync == "on"
        c = GarageCluster(install(), work, base, fsync).start()
        # The servers outlive this script: the caller stops them by pid.
        print(f'garage_pids="{" ".join(map(str, c.pids()))}"')
        print(f'garage_addrs="{c.addrs()}"')
        for k, v in c.env().items():
            print(f"export {k}='{v}'")
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
