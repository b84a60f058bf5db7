"""An epoch of a backbone model's head over 10,000 photos' features, as the daemon trains it
(daemon.training.epochs.EpochBatches: the seeded per-epoch order, one tf.data pipeline,
the progress and stop callbacks), beside plain `model.fit` on the same arrays: issue 14
asks for well under a second. Features are random (the cost does not depend on them).

    .venv/bin/python bench/head_epoch.py [--photos 10000] [--epochs 5]
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import daemon  # noqa: E402,F401  (before cv2/keras: the pixel cap)
from daemon.service import logs  # noqa: E402

logs.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from daemon.training import models  # noqa: E402
from daemon.training.epochs import EpochBatches, Progress, StopOnEvent  # noqa: E402
from report import machine  # noqa: E402


class _Trainer:  # what _Progress updates
    epoch = step = 0
    trained_once = True
    last_progress = 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.random((args.photos, 1280), dtype=np.float32)
    y = rng.integers(0, args.classes, args.photos).astype(np.int32)

    daemon_model = models.build("efficientnet_lite0", num_classes=args.classes)
    batches = EpochBatches(x, y, args.batch_size, seed=0)
    callbacks = [StopOnEvent(threading.Event()), Progress(_Trainer())]
    plain_model = models.build("efficientnet_lite0", num_classes=args.classes)

    def daemon_epoch(epoch):
        daemon_model.fit(batches.of_epoch(epoch), initial_epoch=epoch, epochs=epoch + 1,
                         shuffle=False, verbose=0, callbacks=callbacks)

    def plain_epoch(epoch):
        plain_model.fit(x, y, batch_size=args.batch_size, initial_epoch=epoch,
                        epochs=epoch + 1, shuffle=True, verbose=0)

    times = {"daemon": [], "plain_fit": []}
    for epoch in range(args.epochs + 1):  # the first traces: reported apart
        for name, run in (("daemon", daemon_epoch), ("plain_fit", plain_epoch)):
            started = time.perf_counter()
            run(epoch)
            times[name].append(time.perf_counter() - started)
    result = {"photos": args.photos, "batch_size": args.batch_size,
              "first_epoch_s": {k: round(v[0], 3) for k, v in times.items()},
              "epoch_s_median": {k: round(float(np.median(v[1:])), 3) for k, v in times.items()},
              "machine": machine()}
    result["ratio_daemon_to_plain"] = round(
        result["epoch_s_median"]["daemon"] / result["epoch_s_median"]["plain_fit"], 3)
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent.parent / "docs" / "bench-head-epoch.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
