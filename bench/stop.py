"""Stop benchmark: SIGTERM at random moments of a daemon's life -- TensorFlow still loading,
training, the final evaluation of a large test set, labelling a photo backlog, idle -- and
the time until the process has exited, its exit code, and whether the checkpoint holds
every batch trained (the newest generation's epoch/step against the last logged progress).

    .venv/bin/python bench/stop.py [--rounds 5] [--out docs/bench-stop.json]

Reference, in the same run: the same daemon stopped with SIGKILL (the floor: no
checkpoint, no goodbye) -- the difference is what a clean stop costs.
"""

import argparse
import json
import os
import platform
import random
import re
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
from daemon.training.store import CheckpointStore  # noqa: E402

# moment -> (log line to wait for, extra seconds of random delay at most)
MOMENTS = {
    "loading": (r"watching .* for ", 0.5),
    "training": (r"ready: model restored", 2.0),
    "evaluating": (r"epoch 2/2: loss", 0.3),
    "labelling photos": (r"labelling with checkpoint", 1.0),
    "idle": (r"training complete", 0.5),
}


def make_data(folder):
    sample = dataset.load("sample")
    dataset.write_idx_folder(folder, (sample.x_train[:4096], sample.y_train[:4096]),
                             (np.tile(sample.x_test, (30, 1, 1)), np.tile(sample.y_test, 30)))
    return sample


def photo(crop, rng):
    height, width = 3024, 4032
    background = rng.normal(230, 5, (height, width)).clip(0, 255).astype(np.uint8)
    item = cv2.resize(255 - crop, (2400, 2400), interpolation=cv2.INTER_CUBIC)
    top, left = (height - 2400) // 2, (width - 2400) // 2
    region = background[top:top + 2400, left:left + 2400]
    background[top:top + 2400, left:left + 2400] = np.where(item < 200, item, region)
    return cv2.imencode(".jpg", background, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def one(folder, data, photos, moment, how, rng):
    folder.mkdir(parents=True)
    (folder / "inbox").mkdir()
    if moment == "labelling photos":
        for i, data_bytes in enumerate(photos):
            (folder / "inbox" / f"IMG_{i:03d}.jpg").write_bytes(data_bytes)
    (folder / "config.yaml").write_text(
        f"data: {{source: path, path: {data}}}\nmodel: cnn\n"
        "train: {epochs: 2, checkpoint_every: 20, batch_size: 64}\n")
    log_path = folder / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config",
                                    str(folder / "config.yaml")], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO)
    pattern, spread = MOMENTS[moment]
    deadline = time.monotonic() + 300
    while not re.search(pattern, log_path.read_text(errors="replace")):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.005)
    time.sleep(rng.uniform(0, spread))
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    code = process.wait(60)
    seconds = time.monotonic() - sent
    text = log_path.read_text(errors="replace")
    newest, _ = CheckpointStore(folder / "save").scan()
    return {"moment": moment, "signal": how, "exit_code": code, "seconds": round(seconds, 3),
            "checkpoint": None if newest is None else [newest["epoch"], newest["step"]],
            "stopped_at": re.findall(r"stopped at batch (\d+) of epoch (\d+)", text)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-stop.json")
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = make_data(tmp / "data")
        photos = [photo(sample.x_test[i], np.random.default_rng(i)) for i in range(60)]
        results = []
        runs = [(m, h) for m in MOMENTS for h in ("SIGTERM", "SIGKILL")] * args.rounds
        rng.shuffle(runs)
        for index, (moment, how) in enumerate(runs):
            result = one(tmp / f"run-{index}", tmp / "data", photos, moment, how, rng)
            print(json.dumps(result), flush=True)
            results.append(result)
    summary = {}
    for moment in MOMENTS:
        for how in ("SIGTERM", "SIGKILL"):
            times = sorted(r["seconds"] for r in results if r["moment"] == moment
                           and r["signal"] == how)
            codes = sorted({r["exit_code"] for r in results if r["moment"] == moment
                            and r["signal"] == how})
            summary[f"{moment} / {how}"] = {"median_s": times[len(times) // 2],
                                            "max_s": times[-1], "exit_codes": codes}
    for key, value in summary.items():
        print(f"{key:28s} median {value['median_s']:.3f} s  max {value['max_s']:.3f} s  "
              f"exit {value['exit_codes']}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version()}
    args.out.write_text(json.dumps({"machine": machine, "summary": summary, "runs": results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
