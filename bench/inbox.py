"""Inbox benchmark: burst throughput, single-image latency (idle and while training), the
tutorial's per-image way, memory over a long run, photo accuracy.

    .venv/bin/python bench/inbox.py [--out docs/bench-inbox.json] [--long 100000]

Each daemon is a real `python -m daemon run` subprocess, trained on the bundled sample.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from daemon.data import dataset  # noqa: E402


class Daemon:
    def __init__(self, folder, epochs, checkpoint_every="epoch"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.inbox = self.folder / "inbox"
        (self.folder / "config.yaml").write_text(
            f"data: {{source: sample}}\ntrain: {{epochs: {epochs}, "
            f"checkpoint_every: {checkpoint_every}}}\n")
        self.log = self.folder / "daemon.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.folder / "config.yaml")],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=REPO)

    def wait_for(self, pattern, timeout=300):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text()):
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"timed out waiting for {pattern}"
            time.sleep(0.05)

    def rss_mb(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.log.read_text()[-2000:]


def stage(folder, crops, count, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    encoded = [cv2.imencode(".png", crop)[1].tobytes() for crop in crops]
    for i in range(count):
        (folder / f"{prefix}-{i:06d}.png").write_bytes(encoded[i % len(encoded)])
    return sorted(folder.iterdir())


def count_sidecars(folder):
    return sum(1 for entry in os.scandir(folder) if entry.name.endswith(".json"))


def burst(daemon, crops, staging, count):
    """Move `count` PNGs into the inbox at once; seconds until every sidecar exists."""
    files = stage(staging, crops, count, "burst")
    target = daemon.inbox / "burst"
    target.mkdir()
    started = time.monotonic()
    for path in files:
        os.rename(path, target / path.name)
    while count_sidecars(target) < count:
        time.sleep(0.1)  # a scan of 20,000 names: not too often, it competes for the CPU
    return time.monotonic() - started


def latencies(daemon, crops, staging, count, subfolder):
    """Drop one image at a time (renamed in); ms until its sidecar exists."""
    target = daemon.inbox / subfolder
    target.mkdir()
    files = stage(staging, crops, count, subfolder)
    times = []
    for path in files:
        sidecar = target / (path.name + ".json")
        started = time.perf_counter()
        os.rename(path, target / path.name)
        while not sidecar.exists():
            time.sleep(0.0005)
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)  # idle in between
    return times


def tutorial_way(save, crops, staging, count):
    """cv2.imread + model.predict per image, as the tutorial labels one image."""
    import keras

    model = keras.models.model_from_json((save / "model.json").read_text())
    model.load_weights(str(save / "model.h5"))
    files = stage(staging, crops, count, "tutorial")
    started = time.monotonic()
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) / 255.0
        probabilities = model.predict(image[None], verbose=0)[0]
        Path(f"{path}.json").write_text(json.dumps({"class": int(probabilities.argmax())}))
    return count / (time.monotonic() - started)


def long_run(daemon, crops, staging, total, chunk=10_000):
    """RSS after each chunk of `chunk` images; labelled files are removed between chunks."""
    rss = [round(daemon.rss_mb())]
    target = daemon.inbox / "long"
    files = stage(staging, crops, chunk, "long")
    for round_ in range(total // chunk):
        target.mkdir()
        for path in files:
            shutil.copy(path, target / path.name)
        while count_sidecars(target) < chunk:
            time.sleep(0.05)
        # Out of the inbox first: the daemon removes the sidecars of deleted images itself,
        # which would race with rmtree.
        shutil.rmtree(target.rename(staging.parent / f"done-{round_}"), ignore_errors=True)
        rss.append(round(daemon.rss_mb()))
    return rss


def photo_accuracy(daemon, sample, staging):
    """The sample's test images as product photos (dark object on white, 8-14x larger,
    off-centre, tinted, JPEG) next to the 28x28 crops, labelled by the daemon."""
    rng = np.random.default_rng(0)
    crops_dir, photos_dir = daemon.inbox / "crops", daemon.inbox / "photos"
    staged_crops, staged_photos = staging / "crops", staging / "photos"
    staged_crops.mkdir(parents=True)
    staged_photos.mkdir(parents=True)
    for i, crop in enumerate(sample.x_test):
        cv2.imwrite(str(staged_crops / f"{i:04d}.png"), crop)
        scale = rng.uniform(8, 14)
        big = cv2.resize(255 - crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        pads = rng.integers(10, 120, size=4)
        photo = cv2.copyMakeBorder(big, *map(int, pads), cv2.BORDER_CONSTANT, value=255)
        tint = rng.uniform(0.85, 1.0, size=3)
        colour = np.clip(photo[:, :, None] * tint + rng.normal(0, 3, photo.shape + (3,)), 0, 255)
        cv2.imwrite(str(staged_photos / f"{i:04d}.jpg"), colour.astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    os.rename(staged_crops, crops_dir)
    os.rename(staged_photos, photos_dir)
    n = len(sample.x_test)
    while count_sidecars(crops_dir) < n or count_sidecars(photos_dir) < n:
        time.sleep(0.1)

    def accuracy(folder, extension):
        predicted = [json.loads((folder / f"{i:04d}.{extension}.json").read_text())["class"]
                     for i in range(n)]
        return round(float(np.mean(np.array(predicted) == sample.y_test)), 4)

    return {"crops_28x28": accuracy(crops_dir, "png"), "photos": accuracy(photos_dir, "jpg"),
            "images": n}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--long", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sample = dataset.load("sample")
    crops = sample.x_test[:500]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        idle = Daemon(work / "idle", epochs=args.epochs)
        idle.wait_for(r"training complete")
        results["photo_accuracy"] = photo_accuracy(idle, sample, work / "staging-photos")
        print("accuracy", results["photo_accuracy"], flush=True)
        seconds = burst(idle, crops, work / "staging-burst", args.burst)
        results["burst"] = {"images": args.burst, "seconds": round(seconds, 2),
                            "images_per_s": round(args.burst / seconds)}
        print("burst", results["burst"], flush=True)
        results["tutorial_images_per_s"] = round(
            tutorial_way(idle.folder / "save", crops, work / "staging-tutorial", 200), 1)
        print("tutorial", results["tutorial_images_per_s"], flush=True)
        times = latencies(idle, crops, work / "staging-idle", 200, "idle")
        results["latency_idle_ms"] = {"p50": round(np.percentile(times, 50), 1),
                                      "p99": round(np.percentile(times, 99), 1)}
        print("idle latency", results["latency_idle_ms"], flush=True)
        busy = Daemon(work / "busy", epochs=1000, checkpoint_every=100)
        busy.wait_for(r"labelling with checkpoint|epoch 1/")
        times = latencies(busy, crops, work / "staging-busy", 100, "busy")
        results["latency_training_ms"] = {"p50": round(np.percentile(times, 50), 1),
                                          "p99": round(np.percentile(times, 99), 1)}
        print("latency while training", results["latency_training_ms"], flush=True)
        busy.stop()
        rss = long_run(idle, crops, work / "staging-long", args.long)
        results["long_run"] = {"images": args.long, "rss_mb_per_10k": rss}
        print("long run RSS MB", rss, flush=True)
        idle.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
