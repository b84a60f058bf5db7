"""Labelling a backlog of 12-megapixel phone photos with the backbone (issue 14): a real
`python -m daemon run` with a trained efficientnet_lite0 save/ (trained once on a copy of
../shared/data/photos-sample, cached) starts with the photos waiting in its inbox, and a few
new photos in its data folder, so that it trains on a new data version while it labels.
Against the in-process ceiling on the same files in the same run (photobench.ceiling: decode
on both cores, the TFLite features, the head's predict).

Measured: photos/s (ready, or the first sidecar if earlier, to the last sidecar); READY (the
log's "ready:") to the first sidecar; peak RSS of the daemon and all its child processes
(summed over the process tree, sampled every 0.2 s); whether systemd's watchdog was fed
(WATCHDOG_USEC=60 s as the unit sets it, a stand-in notify socket recording the pings: the
largest gap, and any "not pinging the systemd watchdog" line); epochs trained meanwhile.

    PYTHONPATH=. .venv/bin/python bench/label_photos.py [--quick] [--photos 600]

Results: docs/bench-label-photos.json. Goals: >= 80% of the ceiling, first sidecar <= 2 s
after READY, peak RSS <= 1.5 GB, the watchdog fed, epochs trained during the burst.
"""

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import cv2

import photobench
from daemonproc import READY, REPO, Daemon, copy_save, sidecar_times, wait_for_sidecars
from report import OtherLoad, code_version, machine

OUT = REPO / "docs" / "bench-label-photos.json"
TRAINED = photobench.CACHE / "trained-v2"  # v2: made with features kept apart (features.py)
FIRST_PHOTO = 10_000  # the backlog's photos: other contents than featurize.py's
NEW_PHOTOS = 8  # added to the data folder: a new data version to train on meanwhile
EPOCHS = 3


def trained():
    """TRAINED/save (efficientnet_lite0, EPOCHS epochs on TRAINED/data, a copy of the
    sample's JPEGs), made once."""
    if (TRAINED / "complete").exists():
        return TRAINED
    shutil.rmtree(TRAINED, ignore_errors=True)
    for path, klass in photobench.sample_photos():
        (TRAINED / "data" / klass).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, TRAINED / "data" / klass / path.name)
    photobench.seed_save(TRAINED / "save")
    daemon = Daemon(TRAINED, data=photobench.folder_data(TRAINED / "data"),
                    model="efficientnet_lite0", epochs=EPOCHS)
    try:
        daemon.wait_for(r"training complete", timeout=1800)
    finally:
        daemon.stop()
    (TRAINED / "complete").write_text("")
    return TRAINED


def head_model(save):
    """The trained head alone (features in, classes out), from the exported whole model."""
    import keras

    whole = keras.models.model_from_json((save / "model.json").read_text())
    whole.load_weights(str(save / "model.h5"))
    features = keras.Input((whole.get_layer("output").input.shape[-1],))
    return keras.Model(features, whole.get_layer("output")(features))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 photos")
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--ceiling-photos", type=int, default=None,
                        help="photos the ceiling runs on (evenly spread; default all, 200 "
                             "of the full backlog)")
    parser.add_argument("--limit", type=float, default=900, help="seconds to wait at most")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    count = args.photos or (100 if args.quick else 600)
    photos = photobench.phone_photos(FIRST_PHOTO, count, name="backlog")
    base = trained()
    load = OtherLoad()
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-label-"))
    notify = photobench.NotifySocket(watchdog_seconds=60)
    try:
        paths = [path for path, _ in photos]
        subset = paths[::max(1, count // (args.ceiling_photos or (count if count <= 200
                                                                   else 200)))]
        limit = photobench.ceiling(subset, head=head_model(base / "save"))
        print(f"ceiling: {limit['photos_per_s']} photos/s ({limit['fastest']})", flush=True)
        run = root / "run"
        copy_save(base / "save", run)
        # Hard links: the same files (inodes, mtimes), as a restart finds its data folder
        shutil.copytree(base / "data", run / "data", copy_function=os.link)
        for path, klass in photobench.sample_photos()[:NEW_PHOTOS]:
            image = cv2.imread(str(path))
            cv2.imwrite(str(run / "data" / klass / f"mirrored-{path.stem}.jpg"), image[:, ::-1])
        inbox = root / "inbox"
        photobench.place(photos, inbox, by_class=False)
        daemon = Daemon(run, inbox=inbox, data=photobench.folder_data(run / "data"),
                        model="efficientnet_lite0", epochs=EPOCHS, env=notify.env())
        memory = photobench.TreeMemory(daemon.pid)
        try:
            ready = daemon.wait_for(READY, timeout=600)
            try:
                wait_for_sidecars(daemon, [inbox], count, timeout=args.limit, every=0.2)
            except TimeoutError:
                print(f"stopped waiting after {args.limit} s", flush=True)
            end = time.time()
            peak = memory.stop()
            hwm = daemon.peak_rss_mb()
        finally:
            daemon.stop()
        times = sidecar_times(inbox)
        lines = photobench.log_lines(daemon)
        shutil.copy2(daemon.log, photobench.CACHE / "label-photos-daemon.log")  # to look at
    finally:
        notify.close()
        shutil.rmtree(root, ignore_errors=True)
    first, last = min(times), max(times)
    start = min(ready, first)
    rate = len(times) / (last - start)
    epochs = [(stamp, message) for stamp, message in lines
              if re.match(r"epoch \d+/\d+: ", message) and start <= stamp <= last]
    first_batch = next((stamp for stamp, message in lines
                        if message.startswith("first batch trained")), None)
    hungry = [message for _, message in lines if "not pinging the systemd watchdog" in message]
    gap = notify.largest_gap(ready, end)
    fed = not hungry and gap < notify.watchdog_seconds
    results = {
        "photos": count, "done": len(times), "megapixels": 12.2,
        "photos_per_s": round(rate, 2), "ceiling": limit,
        "ratio": round(rate / limit["photos_per_s"], 3),
        "start_to_ready_s": round(ready - daemon.started, 2),
        "first_sidecar_after_ready_s": round(first - ready, 2),
        "all_after_start_s": round(last - daemon.started, 2),
        "peak_rss_tree_mb": peak, "peak_rss_daemon_alone_mb": round(hwm),
        "watchdog": {"usec": int(notify.watchdog_seconds * 1e6), "pings": len(notify.pings),
                     "largest_gap_s": round(gap, 2), "not_pinging_lines": hungry, "fed": fed},
        "training": {"epochs_during_burst": len(epochs),
                     "epoch_lines": [message for _, message in epochs],
                     "first_batch_after_ready_s": None if first_batch is None
                     else round(first_batch - ready, 2)},
        "goal": "ratio >= 0.8, first sidecar <= 2 s after ready, tree RSS <= 1536 MB, "
                "watchdog fed, epochs trained during the burst",
        "quick": args.quick, "machine": machine(), "code": code_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **load.measure()}
    results["met"] = {"ratio": results["ratio"] >= 0.8,
                      "first_sidecar": first - ready <= 2, "memory": peak <= 1536,
                      "watchdog": fed, "training": len(epochs) > 0,
                      "all_done": len(times) == count}
    photobench.store(args.out, "label_photos", results)
    met = results["met"]
    rows = [("photos/s", results["photos_per_s"], limit["photos_per_s"], results["ratio"],
             ">= 0.8", met["ratio"]),
            ("READY -> first sidecar, s", results["first_sidecar_after_ready_s"], "", "",
             "<= 2", met["first_sidecar"]),
            ("peak RSS, daemon + children, MB", peak, "", "", "<= 1536", met["memory"]),
            ("peak RSS, daemon alone (VmHWM), MB", round(hwm), "", "", "", ""),
            ("watchdog: largest gap between pings, s", results["watchdog"]["largest_gap_s"],
             "", "", "< 60, no 'not pinging'", fed),
            ("epochs trained during the burst", len(epochs), "", "", "> 0", met["training"]),
            ("sidecars", f"{len(times)}/{count}", "", "", "all", met["all_done"]),
            ("other load on the machine, cores", results["other_load_cores"], "", "", "", "")]
    print(f"\n{count} 12-MP photos waiting at start\n" + photobench.table(rows) +
          f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
