"""Helpers shared by the Python benchmark drivers (hint-bench.py, aae-bench.py)."""
import os

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
