"""What a benchmark result needs besides its figures: the machine, the code measured, and
how busy the (shared) machine was with other work meanwhile."""

import os
import platform
import subprocess
import time
from importlib import metadata

from daemonproc import REPO


class OtherLoad:
    """How busy the machine was with work not of this benchmark (other users of a shared
    machine skew every figure): all CPU time from /proc/stat minus ours and our children's
    (the daemons and pools are all waited for by the end of a benchmark)."""

    def __init__(self):
        self.started, self.busy, self.ours = time.monotonic(), _busy_seconds(), _our_seconds()

    def measure(self):
        elapsed = time.monotonic() - self.started
        others = (_busy_seconds() - self.busy) - (_our_seconds() - self.ours)
        return {"bench_s": round(elapsed, 1),
                "other_load_cores": round(max(others, 0.0) / elapsed, 2)}


def _busy_seconds():
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user


def _our_seconds():
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    memory = next(line.split()[1] for line in open("/proc/meminfo")
                  if line.startswith("MemTotal"))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "memory_gb": round(int(memory) / 1024 ** 2, 1),
            "python": platform.python_version(), "tensorflow": metadata.version("tensorflow"),
            "kernel": platform.release()}


def code_version():
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--", "daemon"))
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted daemon/ changes" if dirty
                                                  else "")
