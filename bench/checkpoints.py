"""Checkpoint benchmark: overhead on full-size epochs, write time, stop and restart times.

    .venv/bin/python bench/checkpoints.py [--rounds 3] [--out docs/bench-checkpoints.json]

Full-size epochs are the bundled sample repeated to 60,000 images. Configurations train
side by side, one epoch each in turn, so machine noise spreads over all of them; each figure
is a median over rounds. keras.callbacks.BackupAndRestore is measured in the same run.
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from daemon.data import dataset  # noqa: E402
from daemon.training import models  # noqa: E402
from daemon.training.checkpoints import Checkpoint  # noqa: E402

FULL = 60_000


def full_size_data(folder):
    sample = dataset.load("sample")
    repeat = -(-FULL // len(sample.x_train))
    x = np.tile(sample.x_train, (repeat, 1, 1))[:FULL]
    y = np.tile(sample.y_train, repeat)[:FULL]
    dataset.write_idx_folder(folder, (x, y), (sample.x_test, sample.y_test))
    return x.astype("float32") / 255.0, y


class Timed(keras.callbacks.Callback):
    """Wraps a callback and records the time spent in its batch and epoch hooks."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls_ms = inner, []

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def _timed(self, name, *args):
        started = time.perf_counter()
        getattr(self.inner, name)(*args)
        self.calls_ms.append((time.perf_counter() - started) * 1000)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._timed("on_train_batch_end", batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._timed("on_epoch_end", epoch, logs)

    def on_train_end(self, logs=None):
        self.inner.on_train_end(logs)


def overhead(x, y, rounds, workdir):
    def ours(every):
        return lambda d: Checkpoint(d, every_batches=every)

    def keras_backup(freq):
        return lambda d: keras.callbacks.BackupAndRestore(d, save_freq=freq,
                                                          delete_checkpoint=False)

    configs = {
        "none": None,
        "wardrobe, every epoch": ours(None),
        "wardrobe, every 100 batches": ours(100),
        "BackupAndRestore, every epoch": keras_backup("epoch"),
        "BackupAndRestore, every 100 batches": keras_backup(100),
    }
    runs = {}
    for name, make in configs.items():
        keras.utils.set_random_seed(0)
        model = models.build("mlp")
        callback = Timed(make(str(workdir / re.sub(r"\W+", "-", name)))) if make else None
        runs[name] = {"model": model, "callback": callback, "epochs": [], "writes": []}
    order = list(runs.items())
    shuffle = np.random.default_rng(0).shuffle
    for round_ in range(rounds + 1):  # round 0 warms up (tracing)
        shuffle(order)  # no configuration always runs first (or after the slowest)
        for name, run in order:
            callbacks = [run["callback"]] if run["callback"] else []
            if run["callback"]:
                run["callback"].calls_ms.clear()
            started = time.perf_counter()
            run["model"].fit(x, y, batch_size=32, initial_epoch=round_, epochs=round_ + 1,
                             shuffle=False, verbose=0, callbacks=callbacks)
            seconds = time.perf_counter() - started
            if round_:
                run["epochs"].append(seconds)
                if run["callback"]:
                    calls = run["callback"].calls_ms
                    run["writes"] += [ms for ms in calls if ms > 1.0]  # the calls that wrote
                    run.setdefault("callback_total", []).append(sum(calls) / 1000)
    base = statistics.median(runs["none"]["epochs"])
    table = {}
    for name, run in runs.items():
        epoch = statistics.median(run["epochs"])
        row = {"epoch_s": round(epoch, 3), "overhead_pct": round(100 * (epoch - base) / base, 2)}
        if run["callback"]:
            spent = statistics.median(run["callback_total"])
            row["time_in_callback_s"] = round(spent, 4)
            row["callback_pct_of_epoch"] = round(100 * spent / base, 2)
            row["checkpoint_write_ms"] = round(statistics.median(run["writes"]), 1)
        table[name] = row
        print(f"{name:38s} {row}", flush=True)
    return table


def daemon_command(config, data_folder, save, checkpoint_every):
    """Write a long-training daemon config on the full-size data; its `run` command."""
    config.write_text(f"save: {save}\ndata: {{source: path, path: {data_folder}}}\n"
                      f"train: {{epochs: 1000, checkpoint_every: {checkpoint_every}}}\n")
    return [sys.executable, "-m", "daemon", "run", "--config", str(config)]


def sigterm_to_exit(data_folder, workdir, repeats):
    """SIGTERM at various points of a full-size epoch -> process exit, in ms."""
    command = daemon_command(workdir / "config.yaml", data_folder, "save", "epoch")
    times = []
    for i in range(repeats):
        log = workdir / f"run-{i}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            while not re.search("resuming from|no checkpoint in", log.read_text()):
                time.sleep(0.01)
            time.sleep(1.0 + i * 0.7)  # stop at various points of the epoch
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
            times.append((time.monotonic() - sent) * 1000)
        text = log.read_text()
        assert code == 0 and "bye" in text, text[-2000:]
    return times


def first_batch_after_restart(data_folder, workdir, repeats):
    """Spawn -> first checkpoint after the first batch, with checkpoint_every: 1."""
    command = daemon_command(workdir / "config1.yaml", data_folder, "save1", 1)
    save, times = workdir / "save1", []
    for i in range(repeats + 1):
        newest = max(save.glob("ckpt-*.json"), default=None)
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=REPO)
        while max(save.glob("ckpt-*.json"), default=None) == newest:
            time.sleep(0.005)
        if i:  # the first start has no checkpoint to restore
            times.append(time.monotonic() - started)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    return times


def status_ms(workdir, repeats):
    command = [sys.executable, "-m", "daemon", "status", "--json", "--config",
               str(workdir / "config.yaml")]
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        times.append((time.monotonic() - started) * 1000)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x, y = full_size_data(work / "data")
        results = {"machine": f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                              f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
                   "epoch_images": FULL, "batch_size": 32,
                   "overhead": overhead(x, y, args.rounds, work)}
        stops = sigterm_to_exit(work / "data", work, args.repeats)
        results["sigterm_to_exit_ms"] = {"median": round(statistics.median(stops)),
                                         "all": [round(t) for t in stops]}
        print("SIGTERM -> exit ms", results["sigterm_to_exit_ms"], flush=True)
        firsts = first_batch_after_restart(work / "data", work, args.repeats)
        results["restart_to_first_batch_s"] = {"median": round(statistics.median(firsts), 2),
                                               "all": [round(t, 2) for t in firsts]}
        print("restart -> first batch s", results["restart_to_first_batch_s"], flush=True)
        statuses = status_ms(work, args.repeats)
        results["status_ms"] = {"median": round(statistics.median(statuses)),
                                "all": [round(t) for t in statuses]}
        print("status ms", results["status_ms"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
