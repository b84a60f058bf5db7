"""Accuracy on real photos (issue 14): the daemon (efficientnet_lite0, a real `python -m
daemon run`) against the same backbone's linear probe trained in process -- features from the
same TensorFlow Lite runtime, one Keras Dense softmax layer, Adam, the same epochs and
batch size, the best epoch chosen on the same validation photos (the daemon's content-hash
split: versions.is_validation of each file's sha256) -- on ../shared/data/photos-sample:

- validation: the daemon trained on the whole folder; its best checkpoint's validation
  accuracy vs the probe's best epoch on the daemon's own data version (its features and
  split, read from save/data);
- k-fold: stratified folds of all photos (photo_aspect._folds, seed 0); per fold a folder
  with the other folds as class folders and this fold's photos in the inbox; the daemon
  trains, is stopped, `wardrobe relabel` labels the inbox with the best checkpoint, the
  sidecars are scored; the probe, on the same folds, scored on the same photos.

    PYTHONPATH=. .venv/bin/python bench/accuracy_photos.py [--quick] [--epochs 20] [--folds 5]

Results: docs/bench-accuracy-photos.json. Goal: the daemon within 1 point of the probe.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import photobench
from daemonproc import REPO, Daemon, environment
from photo_aspect import _folds
from report import OtherLoad, code_version, machine

sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from daemon.data import photos as photo_prep, versions  # noqa: E402

OUT = REPO / "docs" / "bench-accuracy-photos.json"
GOAL_POINTS = 1.0
BATCH = 32


def probe(x, y, x_val, y_val, x_test, y_test, epochs, classes, seed=0):
    """The reference: a Dense softmax on the features, Adam, `epochs` of batches of 32; the
    epoch of best validation accuracy (the earliest of equals, as the daemon's best
    checkpoint) -> (its validation accuracy, its test accuracy or None)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((x.shape[1],)),
                              keras.layers.Dense(classes, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    best = (-1.0, None)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        model.fit(x[order], y[order], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        val = float((model.predict(x_val, verbose=0).argmax(1) == y_val).mean()) \
            if len(x_val) else 0.0
        if val > best[0]:
            test = None if x_test is None else \
                float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
            best = (val, test)
    return best


def train(work, data, epochs, inbox=None, while_running=None):
    """A daemon on `data` until training completes (then `while_running()`); its save/."""
    photobench.seed_save(work / "save")
    daemon = Daemon(work, inbox=inbox, data=photobench.folder_data(data),
                    model="efficientnet_lite0", epochs=epochs)
    try:
        daemon.wait_for(r"training complete", timeout=3600)
        if while_running:
            while_running()
    finally:
        daemon.stop()
    return work / "save"


def relabel(config):
    done = subprocess.run([sys.executable, "-m", "daemon", "relabel", "--config", str(config)],
                          cwd=REPO, env=environment(), capture_output=True, text=True)
    if done.returncode:
        print(f"relabel exited {done.returncode}: {done.stderr[-800:]}", flush=True)


def best_validation(save):
    from daemon.training.store import CheckpointStore

    best = CheckpointStore(save).best()
    return float(best["validation_accuracy"]), int(best["epoch"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs, 2 of the 5 folds")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--folds", type=int, default=None, help="how many of the 5 folds run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    epochs = args.epochs or (5 if args.quick else 20)
    run_folds = args.folds or (2 if args.quick else 5)
    load = OtherLoad()
    from daemon.backbone.runtime import Featurizer

    sample = photobench.sample_photos()
    classes = sorted({klass for _, klass in sample})
    featurizer = Featurizer(str(photobench.tflite_path()))
    features, labels, digests, kept = [], [], [], []
    for path, klass in sample:
        try:
            features.append(featurizer(photo_prep.load(str(path))))
        except Exception as error:  # noqa: BLE001 (a photo the daemon skips too)
            print(f"skipped {path.name}: {error}", flush=True)
            continue
        kept.append((path, klass))
        labels.append(classes.index(klass))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    features, labels = np.stack(features), np.array(labels)
    validates = np.array([versions.is_validation(d) for d in digests])
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-accuracy-"))
    results = {"photos": len(kept), "epochs": epochs, "batch_size": BATCH}
    try:
        # the daemon's validation split
        save = train(root / "whole", photobench.SAMPLE, epochs)
        daemon_val, best_epoch = best_validation(save)
        data = versions.Data(versions.VersionStore(save).newest())
        probe_val, _ = probe(data.x_train, data.y_train, data.x_val, data.y_val, None, None,
                             epochs, len(data.classes))
        results["validation"] = {
            "validation_photos": len(data.y_val), "daemon": daemon_val,
            "daemon_best_epoch": best_epoch, "probe": probe_val,
            "points_behind": round(100 * (probe_val - daemon_val), 2)}
        print(f"validation split: daemon {daemon_val:.4f}, probe {probe_val:.4f}", flush=True)
        # k-fold
        folds = []
        for k, (train_rows, test_rows) in enumerate(_folds(labels, 0)[:run_folds]):
            work = root / f"fold-{k}"
            for row in train_rows:
                path, klass = kept[row]
                (work / "data" / klass).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, work / "data" / klass / path.name)
            (work / "inbox").mkdir(parents=True)
            truth = {}
            for row in test_rows:
                path, klass = kept[row]
                name = f"{klass}--{path.name}"
                shutil.copy2(path, work / "inbox" / name)
                truth[name] = klass
            # `wardrobe relabel` while the daemon runs: the daemon relabels with its best
            # checkpoint. (With the daemon stopped, relabel labels in process, and on this
            # code that path fed 28x28 pixels to the backbone model's head: it failed.)
            train(work, work / "data", epochs, inbox=work / "inbox",
                  while_running=lambda: relabel(work / "config.yaml"))
            right = labelled = 0
            for name, klass in truth.items():
                sidecar = work / "inbox" / (name + ".json")
                if sidecar.exists():
                    labelled += 1
                    right += json.loads(sidecar.read_text()).get("label") == klass
            daemon_acc = right / len(truth)
            fit_rows = train_rows[~validates[train_rows]]
            val_rows = train_rows[validates[train_rows]]
            _, probe_acc = probe(features[fit_rows], labels[fit_rows], features[val_rows],
                                 labels[val_rows], features[test_rows], labels[test_rows],
                                 epochs, len(classes))
            folds.append({"fold": k, "test_photos": len(truth), "labelled": labelled,
                          "daemon": round(daemon_acc, 4), "probe": round(probe_acc, 4),
                          "daemon_best": best_validation(work / "save")})
            print(f"fold {k}: daemon {daemon_acc:.4f} ({labelled}/{len(truth)} labelled), "
                  f"probe {probe_acc:.4f}", flush=True)
        daemon_cv = float(np.mean([f["daemon"] for f in folds]))
        probe_cv = float(np.mean([f["probe"] for f in folds]))
        results["kfold"] = {"folds": folds, "of": 5, "daemon": round(daemon_cv, 4),
                            "probe": round(probe_cv, 4),
                            "points_behind": round(100 * (probe_cv - daemon_cv), 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    behind = max(results["validation"]["points_behind"], results["kfold"]["points_behind"])
    results.update({"goal": f"daemon within {GOAL_POINTS} point of the probe",
                    "met": behind <= GOAL_POINTS, "quick": args.quick, "machine": machine(),
                    "code": code_version(),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **load.measure()})
    photobench.store(args.out, "accuracy_photos", results)
    v, f = results["validation"], results["kfold"]
    rows = [(f"validation split ({v['validation_photos']} photos), accuracy", v["daemon"],
             v["probe"], f"{-v['points_behind']:+.1f} pt", f">= -{GOAL_POINTS} pt",
             v["points_behind"] <= GOAL_POINTS),
            (f"{len(f['folds'])} of 5 folds, accuracy", f["daemon"], f["probe"],
             f"{-f['points_behind']:+.1f} pt", f">= -{GOAL_POINTS} pt",
             f["points_behind"] <= GOAL_POINTS),
            ("other load on the machine, cores", results["other_load_cores"], "", "", "", "")]
    print(f"\ndaemon vs the in-process linear probe, {epochs} epochs\n" +
          photobench.table(rows) + f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
