"""Restart to the first trained batch with the backbone (issue 14): a real `python -m daemon
run` (efficientnet_lite0) on a folder of phone photos (the 2,000 of bench/featurize.py)
makes its data version -- the photos' features -- and a first checkpoint, and is stopped;
then restarted again and again on the same save/ and folder: the time from the spawn to the
log's "first batch trained" line and to READY ("ready:"), and whether any features were
computed again (a "decoded N training images" line).

    PYTHONPATH=. .venv/bin/python bench/start_backbone.py [--quick] [--rounds 5]

Results: docs/bench-start-backbone.json. Goal: restart -> first batch <= 5 s, no features
recomputed.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import photobench
from daemonproc import READY, REPO, Daemon
from report import OtherLoad, code_version, machine

OUT = REPO / "docs" / "bench-start-backbone.json"
GOAL_S = 5.0
FIRST_BATCH = r"first batch trained"


def start(work, data):
    return Daemon(work, data=photobench.folder_data(data), model="efficientnet_lite0",
                  epochs=1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 photos, 2 restarts")
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    count = args.photos or (200 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 5)
    photos = photobench.phone_photos(0, count)
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-start-"))
    runs = []
    try:
        data = root / "data"
        photobench.place(photos, data)
        photobench.seed_save(root / "save")
        daemon = start(root, data)
        try:
            daemon.wait_for(r"epoch 1/\d+: ", timeout=3600)  # a version and a checkpoint
        finally:
            daemon.stop()
        load = OtherLoad()
        for round_ in range(rounds):
            daemon = start(root, data)
            try:
                first = daemon.wait_for(FIRST_BATCH, timeout=600)
                ready = daemon.wait_for(READY, timeout=600)
            finally:
                daemon.stop()
            decoded = photobench.first_line(daemon, r"decoded (\d+) training images")
            logged = photobench.first_line(daemon, FIRST_BATCH)[0]
            runs.append({"first_batch_s": round(first - daemon.started, 2),
                         "first_batch_logged_s": round(logged - daemon.started, 2),
                         "ready_s": round(ready - daemon.started, 2),
                         "features_recomputed": int(decoded[1][1]) if decoded else 0})
            print(f"restart {round_}: {runs[-1]}", flush=True)
        measured = load.measure()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = statistics.median(run["first_batch_s"] for run in runs)
    ready = statistics.median(run["ready_s"] for run in runs)
    recomputed = max(run["features_recomputed"] for run in runs)
    results = {"photos": count, "restarts": runs, "median_first_batch_s": first,
               "median_ready_s": ready, "features_recomputed": recomputed,
               "goal": f"spawn -> first batch trained <= {GOAL_S} s, no features recomputed",
               "met": first <= GOAL_S and recomputed == 0, "quick": args.quick,
               "machine": machine(), "code": code_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **measured}
    photobench.store(args.out, "start_backbone", results)
    rows = [("spawn -> first batch trained, s (median)", first, "", "", f"<= {GOAL_S}",
             first <= GOAL_S),
            ("spawn -> READY, s (median)", ready, "", "", "", ""),
            ("features recomputed at restart", recomputed, "", "", "0", recomputed == 0),
            ("other load on the machine, cores", results["other_load_cores"], "", "", "", "")]
    print(f"\nrestarts with a {count}-photo data version\n" + photobench.table(rows) +
          f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
