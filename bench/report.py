"""What goes with the figures of every bench: the machine, the code measured, how busy the
(shared) machine was with other work meanwhile; the runner of the benches made of named
benchmarks (folder, inbox_realworld, web); and bench/inbox_realworld.py's summary table."""

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

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

    """The last commit that changed daemon/ (what is measured), and whether it has
    uncommitted changes."""
    dirty = bool(git("status", "--porcelain", "--", "daemon"))
    return git("log", "-1", "--format=%h", "--", "daemon") + (
        " + uncommitted daemon/ changes" if dirty else "")


def arguments(doc, benchmarks, out):
    """The command line of a bench made of named benchmarks: which to run (all by default),
    where the results are merged (--out) and whether to keep the work folder (--keep); the
    bench adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK",
                        help=f"any of {', '.join(benchmarks)} (default: all)")
    parser.add_argument("--out", type=Path, default=out, help="results are merged into it")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser


def run(parser, args, benchmarks, name, start, suffix=""):
    """Each benchmark chosen on the command line, in the order of `benchmarks`, in one work
    folder under /tmp: `start(root, chosen)` gives {benchmark: a function returning its
    figures}. The machine, the code, the time and the other load go with each benchmark's
    figures, printed as it ends and stored as benchmark+suffix. Returns (the results, the
    seconds all took); `store` merges them into --out."""
    unknown = set(args.benchmarks) - set(benchmarks)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(benchmarks)}")
    chosen = [each for each in benchmarks if each in args.benchmarks] or list(benchmarks)
    root = Path(tempfile.mkdtemp(prefix=f"wardrobe-bench-{name}-"))
    common = {"machine": machine(), "code": code_version(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(common), flush=True)
    results, began = {}, time.monotonic()
    try:
        runs = start(root, chosen)
        for benchmark in chosen:
            load = OtherLoad()
            figures = dict(runs[benchmark](), **common, **load.measure())
            results[benchmark + suffix] = figures
            print(json.dumps({"benchmark": benchmark, **figures}), flush=True)
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results, round(time.monotonic() - began)


def store(out, results):
    """Merge `results` into the JSON file `out` (one key per benchmark, as measured last)."""
    stored = json.loads(out.read_text()) if out.exists() else {}
    stored.update(results)
    out.write_text(json.dumps(stored, indent=1) + "\n")


def summary(results):
    rows = []
    if "burst" in results:
        r = results["burst"]
        limit = r["ceiling"]["images_per_s"]
        rows.append(("burst", "images/s", r["images_per_s"], limit, r["pct_of_ceiling"],
                     ">= 60% of ceiling", r["met"]))
        rows.append(("burst", "images/s, as one folder moved in", r["folder_images_per_s"],
                     limit, round(100 * r["folder_images_per_s"] / limit, 1), "", ""))
    if "photos" in results:
        r = results["photos"]
        done = f" ({r['done']}/{r['photos']} done)" if r["done"] < r["photos"] else ""
        rows.append(("photos", "photos/s" + done, r["photos_per_s"],
                     r["ceiling"]["images_per_s"], r["pct_of_ceiling"], ">= 10",
                     r["photos_per_s"] >= 10))
        first = r["first_sidecar_after_ready_s"]
        rows.append(("photos", "first sidecar after ready, s", first, "", "", "<= 2",
                     first is not None and first <= 2))
        rows.append(("photos", "first sidecar after start, s",
                     r["first_sidecar_after_start_s"], "", "", "", ""))
    if "poll" in results:
        r = results["poll"]
        for mode in ("poll", "inotify"):
            value = r[mode].get("cpu_pct_of_core", "skipped")
            goal = "<= 2" if mode == "poll" else ""
            met = r["met"] if mode == "poll" else ""
            rows.append(("poll", f"idle CPU % of a core, {mode}", value, "", "", goal, met))
    if "startup" in results:
        r = results["startup"]
        rows.append(("startup", "start -> all labelled, s", r["seconds_to_all_labelled"],
                     "", "", "<= 20", r["seconds_to_all_labelled"] <= 20))
        rows.append(("startup", "images/s labelling", r["images_per_s_labelling"],
                     r["ceiling"]["images_per_s"], r["pct_of_ceiling"], "", ""))
        rows.append(("startup", "peak RSS, MB", r["peak_rss_mb"], "", "", "<= 1024",
                     r["peak_rss_mb"] <= 1024))
    for name, r in results.items():
        rows.append((name, "other load on the machine, cores", r["other_load_cores"], "", "",
                     "", ""))
    header = ("benchmark", "measure", "daemon", "ceiling", "% ceil", "goal", "met")
    table = [header] + [tuple("" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)
