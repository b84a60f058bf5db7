"""Shared pieces: small real data, config files, and a real `python -m daemon` subprocess."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
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
    """`python -m daemon run` (or another `command`: worker) as a real subprocess with its
    stderr in a file."""

    def __init__(self, config, wrapper=(), env=None, journal=False, command="run", **popen):
        self.config = Path(config)
        self.log_path = self.config.parent / f"{command}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if journal:  # as systemd does: the stream's device and inode
            info = os.fstat(self._log.fileno())
            environment["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "daemon", command, "--config", str(self.config)],
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
        return int(self.wait_for_log(r"wardrobe (?:worker )?starting \(pid (\d+)\)").group(1))

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


# ---- real photos with the pretrained backbone (issue 14), shared by the photo tests ----

PHOTOS = REPO.parent / "shared" / "data" / "photos-sample"
CLASSES = ("ants", "bees")
TRAIN_PHOTOS, HELD_OUT = 16, 4  # a class; the held-out ones follow the training ones
# 28 training photos in batches of 8: 4 batches an epoch (checkpoint_every 1: 4 generations)
TRAIN = {"epochs": 20, "batch_size": 8, "seed": 7}


def photo_config(folder, data, **settings):
    """A config in `folder` for the class folders in `data`, no `model` key (auto); the
    sidecars come from the newest checkpoint. Keyword arguments: top-level keys or train.*."""
    document = {"data": {"source": "folder", "path": str(data)},
                "train": dict(TRAIN, epochs_per_update=5),
                "classify": {"checkpoint": "newest"}}
    for key, value in settings.items():
        if key in ("model", "data", "classify", "cluster", "weights", "web"):
            document[key] = value
        else:
            document["train"][key] = value
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def arrive(paths, inbox):
    """Copy `paths` into `inbox` as a download lands: written beside it, then renamed in."""
    inbox.mkdir(parents=True, exist_ok=True)
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    for path in paths:
        shutil.copyfile(path, staging / path.name)
        (staging / path.name).rename(inbox / path.name)
    return [inbox / path.name for path in paths]


def with_backbone(save, backbone):
    """A new save/ holding the converted backbone, as if converted at its first start."""
    save.mkdir(parents=True)
    shutil.copytree(backbone / "backbone", save / "backbone")
    return save


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """data/<class>/ with 16 photos a class, and 4 held-out photos a class named
    <class>-<name>.jpg (no spaces, no placeholder gif)."""
    assert PHOTOS.is_dir(), f"{PHOTOS} is missing: the photo tests need ../shared beside the repo"
    root = tmp_path_factory.mktemp("photos")
    (root / "held").mkdir()
    held = []
    for name in CLASSES:
        files = sorted(p for p in (PHOTOS / name).glob("*.jpg") if " " not in p.name)
        (root / "data" / name).mkdir(parents=True)
        for path in files[:TRAIN_PHOTOS]:
            shutil.copyfile(path, root / "data" / name / path.name)
        for path in files[TRAIN_PHOTOS:TRAIN_PHOTOS + HELD_OUT]:
            held.append(Path(shutil.copyfile(path, root / "held" / f"{name}-{path.name}")))
    return types.SimpleNamespace(data=root / "data", held=held)


@pytest.fixture(scope="session")
def backbone(tmp_path_factory):
    """A folder whose backbone/ is the converted backbone (seconds, once a session)."""
    folder = tmp_path_factory.mktemp("backbone")
    code = ("import sys; from daemon.backbone import runtime; "
            "runtime.prepare(sys.argv[1], runtime.locate())")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((folder / "backbone").glob("*.tflite"))
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, photos, backbone):
    """One uninterrupted run with no `model` key: trained to the end, then the held-out
    photos dropped into its inbox and labelled. Tests copy its save/ to run a daemon on it."""
    folder = tmp_path_factory.mktemp("trained")
    config = photo_config(folder, photos.data)
    with_backbone(folder / "save", backbone)
    daemon = Daemon(config)
    try:
        daemon.wait_for_log(r"training complete", 240)
        inbox = arrive(photos.held, folder / "inbox")
        wait_until(lambda: all(sidecar(p) for p in inbox), 120, message="sidecars")
        report = status(config)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log
    return types.SimpleNamespace(folder=folder, save=folder / "save", config=config,
                                 log=daemon.log, status=report, inbox=inbox)


def copy_trained(trained, tmp_path, photos):
    """The trained save/ and a copy of its class folders in tmp_path; (config, data)."""
    shutil.copytree(trained.save, tmp_path / "save")
    data = shutil.copytree(photos.data, tmp_path / "data")
    return photo_config(tmp_path, data), data


BURST = 500  # photos in a burst


@pytest.fixture(scope="session")
def burst(tmp_path_factory):
    """BURST distinct photos made from the sample's ants and bees (each a resized copy:
    no two alike), named <class>-<n>.jpg."""
    import cv2  # after the daemon package, which sets OpenCV's pixel cap first

    assert PHOTOS.is_dir(), f"{PHOTOS} is missing: the photo tests need ../shared beside the repo"
    folder = tmp_path_factory.mktemp("burst")
    sources = [p for name in ("ants", "bees") for p in sorted((PHOTOS / name).glob("*.jpg"))
               if " " not in p.name]
    made = []
    for n in range(BURST):
        source = sources[n % len(sources)]
        image = cv2.imread(str(source))
        width = 240 + 16 * (n // len(sources))
        height = round(image.shape[0] * width / image.shape[1])
        path = folder / f"{source.parent.name}-{n:03d}.jpg"
        cv2.imwrite(str(path), cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
        made.append(path)
    return made
