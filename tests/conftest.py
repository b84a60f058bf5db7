"""Shared pieces: small real data, config files, and a real `python -m daemon` subprocess."""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from daemon.data import dataset
from daemon.training.store import CheckpointStore

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES, TEST_IMAGES = 1024, 256
# root reads anything: without these capabilities it obeys file permissions like anyone
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]


def wait_until(predicate, timeout, interval=0.02, message="condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def sidecar(image):
    """The JSON sidecar record of `image` (a path), or None while there is none."""
    import json

    try:
        return json.loads(Path(f"{image}.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The first 1,024 training and 256 test images of the bundled sample, as IDX files."""
    folder = tmp_path_factory.mktemp("data")
    sample = dataset.load("sample")
    dataset.write_idx_folder(folder, (sample.x_train[:TRAIN_IMAGES], sample.y_train[:TRAIN_IMAGES]),
                             (sample.x_test[:TEST_IMAGES], sample.y_test[:TEST_IMAGES]))
    return folder


def write_config(folder, data, classify=None, **train):
    """A config in `folder` training on `data`; keyword arguments override train.*."""
    settings = {"epochs": 3, "batch_size": 16, "seed": 7, "checkpoint_every": 5}
    settings.update(train)
    document = {"data": {"source": "path", "path": str(data)}, "train": settings}
    if classify:
        document["classify"] = classify
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Daemon:
    """`python -m daemon run` as a real subprocess with its stderr in a file."""

    def __init__(self, config, wrapper=(), env=None, journal=False, **popen):
        self.config = Path(config)
        self.log_path = self.config.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if journal:  # as systemd does: the stream's device and inode
            info = os.fstat(self._log.fileno())
            environment["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=environment, **popen)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern, timeout=60):
        regex = re.compile(pattern)

        def seen():
            if self.process.poll() is not None and not regex.search(self.log):
                raise AssertionError(f"daemon exited {self.process.returncode} before "
                                     f"{pattern!r}:\n{self.log[-3000:]}")
            return regex.search(self.log)

        return wait_until(seen, timeout, message=repr(pattern))

    @property
    def pid(self):
        """The daemon's own pid (not a wrapper's such as strace), from its first log line."""
        return int(self.wait_for_log(r"wardrobe starting \(pid (\d+)\)").group(1))

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout=30):
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout=30):
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        return self.wait()


@pytest.fixture
def daemons():
    """Start daemons through this; any left running are killed at the end of the test."""
    started = []

    def start(config, **kwargs):
        started.append(Daemon(config, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


def run_to_completion(daemons, config, timeout=120):
    """Start a daemon, wait until it has trained every epoch, stop it; returns it."""
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", timeout)
    assert daemon.stop() == 0, daemon.log
    return daemon


def newest_state(save):
    """(manifest, {array name: array}) of the newest verified generation in `save`."""
    generation, _ = CheckpointStore(save).scan()
    assert generation is not None, f"no loadable checkpoint in {save}"
    with np.load(io.BytesIO(generation.read_state())) as arrays:
        return generation.manifest, {name: arrays[name] for name in arrays.files}


def status(config):
    import json

    result = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--config",
                             str(config)], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """A test must not leave threads behind (watchdog's conftest does the same)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(scope="session")
def one_epoch_save(tmp_path_factory, small_data):
    """save/ after one epoch of the standard test settings (checkpoint every 5 batches,
    so it holds two generations); tests copy it."""
    folder = tmp_path_factory.mktemp("one-epoch")
    daemon = Daemon(write_config(folder, small_data, epochs=1))
    try:
        daemon.wait_for_log(r"training complete", 120)
    finally:
        assert daemon.stop() == 0, daemon.log
    return folder / "save"


def assert_loadable(save):
    """After any kill: a verified generation exists and its exports are complete files."""
    import h5py

    generation, damaged = CheckpointStore(save).scan()
    assert generation is not None, f"nothing loadable; damaged: {damaged}"
    with h5py.File(save / "model.h5", "r") as weights:
        assert "output" in weights.attrs["layer_names"].astype(str)
    assert (save / "model.json").read_text().startswith("{")
    return generation
