"""A real `python -m daemon run` subprocess for the benchmarks, and what /proc says of it.

Only the CLI contract is used (config keys, the "ready" log line, sidecars next to images),
so the benchmarks run against whatever daemon code is in the tree.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
READY = r"\bready\b"
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+: (.*)$")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def environment():
    """The tree's code, whatever is installed in the venv; TensorFlow's C++ chatter off."""
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")


def write_config(folder, inbox, epochs=1, watch=None, data=None, model=None, metrics=None,
                 cluster=None, web=None):
    """folder/config.yaml for a daemon on `inbox` and folder/save, trained on `data` (the
    config's data section; default the bundled sample); `watch`, `metrics`, `cluster` and
    `web` (dicts) and `model` only when given."""
    config = {"inbox": str(inbox), "save": str(folder / "save"),
              "data": data or {"source": "sample"}, "train": {"epochs": epochs}}
    if watch is not None:
        config["watch"] = watch
    if model is not None:
        config["model"] = model
    if metrics is not None:
        config["metrics"] = metrics
    if cluster is not None:
        config["cluster"] = cluster
    if web is not None:
        config["web"] = web
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def config_error(folder, watch):
    """None if the tree's config accepts `watch`, else its error message. `wardrobe status`
    validates the config without TensorFlow, so this takes a fraction of a second."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, folder / "inbox", watch=watch)
    done = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(path)],
                          cwd=REPO, env=environment(), capture_output=True, text=True)
    return (done.stderr.strip() or f"exit {done.returncode}") if done.returncode == 2 else None


class Daemon:
    """Started at construction on `inbox` (default folder/inbox), with folder/save and
    folder/daemon.log; `started` is the wall-clock time just before the spawn. `env`: more
    environment variables (e.g. systemd's NOTIFY_SOCKET and WATCHDOG_USEC)."""

    def __init__(self, folder, inbox=None, epochs=1, watch=None, data=None, model=None,
                 metrics=None, env=None, cluster=None, web=None):
        self.folder = Path(folder)
        self.inbox = Path(inbox or self.folder / "inbox")
        self.inbox.mkdir(parents=True, exist_ok=True)
        config = write_config(self.folder, self.inbox, epochs, watch, data, model,
                              metrics, cluster, web)
        self.log = self.folder / "daemon.log"
        self.started = time.time()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env=dict(environment(), **(env or {})))
        self.pid = self.process.pid
        self._peak_kb, self._sampling = 0, True
        self._sampler = threading.Thread(target=self._sample_memory, daemon=True)
        self._sampler.start()

    def wait_for(self, pattern, timeout=300):
        """Wall-clock time at which `pattern` was first seen in the log (polled every 10 ms)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text(errors="replace")):
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in the log after {timeout} s:\n{self.tail()}")
            time.sleep(0.01)
        return time.time()

    def tail(self, chars=3000):
        return self.log.read_text(errors="replace")[-chars:]

    def cpu_seconds(self):
        """utime + stime of the whole process (all its threads) so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat

    def wait_quiet(self, below=0.25, window=2.0, timeout=30):
        """Wait until the process used less than `below` of a core over `window` s (start-up
        scans done); False if it never did within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(window)
            if self.cpu_seconds() - before < below * window:
                return True
        return False

    def _status_kb(self, key):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def _sample_memory(self):
        # VmHWM is already a high-water mark; sampling it keeps the last value seen before
        # the process exits.
        while self._sampling and self.process.poll() is None:
            try:
                self._peak_kb = max(self._peak_kb, self._status_kb("VmHWM"))
            except (OSError, ValueError):
                break
            time.sleep(0.2)

    def peak_rss_mb(self):
        if self.process.poll() is None:
            self._peak_kb = max(self._peak_kb, self._status_kb("VmHWM"))
        return self._peak_kb / 1024

    def stop(self):
        self._sampling = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._sampler.join()


def trained_save(folder):
    """A finished 1-epoch training run on the sample; its save/ is copied into each
    benchmark's folder so those daemons only label."""
    daemon = Daemon(folder, epochs=1)
    try:
        daemon.wait_for(r"training complete", timeout=300)
    finally:
        daemon.stop()
    return folder / "save"


def copy_save(save, folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(save, folder / "save", ignore=shutil.ignore_patterns(".lock"))


def sidecar_times(folder, suffix=".json"):
    """mtimes (wall clock, s) of all sidecars below `folder`: when each was written."""
    times = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(suffix) and not name.startswith("."):
                times.append(os.stat(os.path.join(root, name)).st_mtime_ns / 1e9)
    return times


def count_sidecars(folders, suffix=".json"):
    return sum(1 for folder in folders for entry in os.scandir(folder)
               if entry.name.endswith(suffix) and not entry.name.startswith("."))


def wait_for_sidecars(daemon, folders, count, timeout, every=0.2):
    """Block until `count` sidecars exist in `folders` (not recursive); a dead daemon or
    the deadline raises."""
    deadline = time.monotonic() + timeout
    while count_sidecars(folders) < count:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"daemon exited {daemon.process.returncode}:\n{daemon.tail()}")
        if time.monotonic() > deadline:
            done = count_sidecars(folders)
            raise TimeoutError(f"{done}/{count} sidecars after {timeout} s:\n{daemon.tail()}")
        time.sleep(every)


def log_lines(daemon):
    """[(wall-clock time, message)] of the daemon's log lines (millisecond stamps)."""
    lines = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        if match := LINE.match(line):
            stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S"))
            lines.append((stamp + int(match[2]) / 1000, match[3]))
    return lines
