"""Featurizing a data version (issue 14): a folder of phone-sized JPEGs (12 megapixels, made
from ../shared/data/photos-sample by bench/photobench.py, cached outside git) becomes a
data version of a real `python -m daemon run` (model efficientnet_lite0, its save/backbone/
pre-made, as a restart finds it), against the in-process ceiling on the same files in the
same run (photobench.ceiling: one process, decode on both cores, then the TFLite features,
the faster of two ways).

Daemon figures, from its log: "decoded N training images in X s" (the decode + features
phase alone) and the time from the spawn to "data version N: ..." (committed).

    PYTHONPATH=. .venv/bin/python bench/featurize.py [--quick] [--photos 2000] [--rounds 2]

Results: docs/bench-featurize.json. Goal: the daemon's decode phase >= 80% of the ceiling's
throughput.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import photobench
from daemonproc import REPO, Daemon
from report import OtherLoad, code_version, machine

OUT = REPO / "docs" / "bench-featurize.json"
GOAL = 0.8


def daemon_round(work, photos):
    """One daemon from an empty save/ (backbone pre-made) on a folder of `photos`."""
    data = work / "data"
    photobench.place(photos, data)
    photobench.seed_save(work / "save")
    daemon = Daemon(work, data=photobench.folder_data(data), model="efficientnet_lite0",
                    epochs=1)
    try:
        committed = daemon.wait_for(r"data version \d+: ", timeout=3600)
    finally:
        daemon.stop()
    decoded = photobench.first_line(daemon, r"decoded (\d+) training images in ([\d.]+) s")
    images, seconds = int(decoded[1][1]), float(decoded[1][2])
    return {"decoded": images, "decode_s": seconds,
            "decode_photos_per_s": round(images / seconds, 2),
            "start_to_version_s": round(committed - daemon.started, 2),
            "start_to_version_photos_per_s": round(images / (committed - daemon.started), 2),
            "peak_rss_mb_daemon": round(daemon.peak_rss_mb())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 photos, 1 round")
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    count = args.photos or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 2)
    photos = photobench.phone_photos(0, count)
    photobench.backbone_folder()
    load = OtherLoad()
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-featurize-"))
    pairs = []
    try:
        for round_ in range(rounds):  # each daemon right after its ceiling: a noisy machine
            limit = photobench.ceiling([path for path, _ in photos])
            result = daemon_round(root / f"round-{round_}", photos)
            result["ceiling"] = limit
            result["ratio"] = round(result["decode_photos_per_s"] / limit["photos_per_s"], 3)
            pairs.append(result)
            print(f"round {round_}: daemon {result['decode_photos_per_s']} photos/s, ceiling "
                  f"{limit['photos_per_s']} ({limit['fastest']}), ratio {result['ratio']}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(pair["ratio"] for pair in pairs)
    results = {"photos": count, "megapixels": 12.2, "rounds": pairs, "median_ratio": ratio,
               "goal": f"daemon decode photos/s >= {GOAL} x ceiling", "met": ratio >= GOAL,
               "quick": args.quick, "machine": machine(), "code": code_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **load.measure()}
    photobench.store(args.out, "featurize", results)
    last = pairs[-1]
    rows = [("decode phase, photos/s (median ratio of rounds)", last["decode_photos_per_s"],
             last["ceiling"]["photos_per_s"], ratio, f">= {GOAL}", ratio >= GOAL),
            ("spawn -> data version, s", last["start_to_version_s"], "", "", "", ""),
            ("spawn -> data version, photos/s", last["start_to_version_photos_per_s"],
             last["ceiling"]["photos_per_s"],
             round(last["start_to_version_photos_per_s"] / last["ceiling"]["photos_per_s"], 3),
             "", ""),
            ("ceiling ways, photos/s", "", ", ".join(
                f"{k} {v['photos_per_s']}" for k, v in last["ceiling"]["ways"].items()),
             "", "", ""),
            ("other load on the machine, cores", results["other_load_cores"], "", "", "", "")]
    print(f"\n{count} phone photos -> a data version\n" + photobench.table(rows) +
          f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
