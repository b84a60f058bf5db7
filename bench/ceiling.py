"""The in-process ceiling a daemon's throughput is compared with: the same files, one
process doing only the work itself -- decode (daemon.data.images.load, in a pool of one process
per core), one batched predict, a small file written per image. Nothing watched, nothing
checked, nothing queued.
"""

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from daemonproc import REPO


def _load(path):
    from daemon.data import images  # the tree's code (REPO is on sys.path)

    return images.load(path)


def _model(save):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    model = keras.models.model_from_json((save / "model.json").read_text())
    model.load_weights(str(save / "model.h5"))
    return model


def run(save, paths, out, labels, repeats=1, chunksize=64):
    """Label `paths` into out/run-N/<name>.json with the model in `save`; a dict of figures, from
    the fastest of `repeats` runs. The pool's start and the model's load happen before the
    clock starts. A pool whose worker was killed (by something else on a shared machine)
    is replaced once."""
    try:
        return _run(save, paths, out, labels, repeats, chunksize)
    except BrokenProcessPool as error:
        print(f"ceiling: {error}; once more with a new pool", flush=True)
        return _run(save, paths, out / "again", labels, repeats, chunksize)


def _run(save, paths, out, labels, repeats, chunksize):
    import numpy as np

    model = _model(Path(save))
    model(np.zeros((1, 28, 28), np.float32), training=False)  # build and warm up
    paths = [str(path) for path in paths]
    workers, best = os.cpu_count(), None
    # spawn, not fork: this process has TensorFlow's threads running. An executor, not a
    # multiprocessing.Pool: a killed worker raises instead of hanging map() for ever.
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init) as pool:
        list(pool.map(_load, paths[:workers]))  # workers up, imports done
        for repeat in range(repeats):
            folder = out / f"run-{repeat}"  # new files each time, as the daemon writes
            folder.mkdir(parents=True)
            os.sync()  # start with no writeback pending, as the daemon does after us
            started = time.perf_counter()
            batch = np.stack(list(pool.map(_load, paths, chunksize=chunksize)))
            decoded = time.perf_counter()
            probabilities = model(batch.astype(np.float32) / 255.0, training=False).numpy()
            predicted = time.perf_counter()
            for path, row in zip(paths, probabilities):
                cls = int(row.argmax())
                record = {"label": labels[cls], "class": cls,
                          "confidence": round(float(row[cls]), 4)}
                (folder / (os.path.basename(path) + ".json")).write_text(json.dumps(record) + "\n")
            finished = time.perf_counter()
            if best is None or finished - started < best[-1] - best[0]:
                best = (started, decoded, predicted, finished)
    os.sync()
    started, decoded, predicted, finished = best
    seconds = finished - started
    return {"images": len(paths), "seconds": round(seconds, 3),
            "images_per_s": round(len(paths) / seconds, 1),
            "decode_s": round(decoded - started, 3), "predict_s": round(predicted - decoded, 3),
            "write_s": round(finished - predicted, 3), "decode_processes": workers,
            "best_of": repeats}


def _init():
    import sys

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
