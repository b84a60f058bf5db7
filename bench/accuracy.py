"""Test accuracy of the two model presets, trained by the real daemon on the bundled sample
(8,226 training images), evaluated on its 2,000 test images.

    .venv/bin/python bench/accuracy.py [--epochs 15]
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(model, epochs, folder):
    config = folder / f"{model}.yaml"
    config.write_text(f"save: save-{model}\ninbox: inbox-{model}\ndata: {{source: sample}}\n"
                      f"model: {model}\ntrain: {{epochs: {epochs}}}\n")
    log = folder / f"{model}.log"
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config",
                                    str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        while "training complete" not in log.read_text():
            assert process.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        process.terminate()
        process.wait(60)
    done = re.search(r"test loss ([\d.]+) accuracy ([\d.]+) on (\d+) images", log.read_text())
    return float(done.group(2)), time.monotonic() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("mlp", "cnn"):
            accuracy, seconds = train(model, args.epochs, Path(tmp))
            print(f"{model}: test accuracy {accuracy:.4f} after {args.epochs} epochs on the "
                  f"sample ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
