"""Safety-net rescan benchmark: what one full rescan of an inbox of N labelled images costs
(every image's sidecar read and checked), against the floor of visiting every file at all
(a bare scandir + lstat walk of the same tree), cold and warm page cache.

    .venv/bin/python bench/rescan.py [--images 10000] [--out docs/bench-rescan.json]

At the default `watch.rescan_seconds: 3600`, the cost per hour is the warm figure.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.service.config import Watch  # noqa: E402
from daemon.inbox.inbox import Inbox  # noqa: E402
from daemon.inbox.sidecars import Sidecars  # noqa: E402

RESULT = {"label": "Sneaker", "class": 7, "confidence": 0.98, "epoch": 1, "model": "1@bench"}


def make_tree(root, count, folders=10):
    sidecars = Sidecars("json", ["png"])
    for index in range(count):
        folder = root / f"album-{index % folders:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"IMG_{index:06d}.png"
        image.write_bytes(b"\x89PNG not decoded here" + index.to_bytes(4, "big"))
        os.utime(image, (1, 1))
        sidecars.write(str(image), os.stat(image), RESULT)
    return sidecars


def bare_walk(root):
    count, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def drop_caches():
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-rescan.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "inbox"
        sidecars = make_tree(root, args.images)
        inbox = Inbox(root, sidecars, Watch(mode="inotify"))
        for cache in ("cold", "warm"):
            if cache == "cold" and not drop_caches():
                continue
            files, walk_wall, walk_cpu = timed(lambda: bare_walk(str(root)))
            if cache == "cold":
                drop_caches()
            found, scan_wall, scan_cpu = timed(
                lambda: [p for p in inbox._scan(inbox.root) if p])
            assert not found, "every image has an up-to-date sidecar"
            results[cache] = {"files": files, "walk_wall_s": round(walk_wall, 3),
                              "walk_cpu_s": round(walk_cpu, 3),
                              "rescan_wall_s": round(scan_wall, 3),
                              "rescan_cpu_s": round(scan_cpu, 3)}
            print(f"{cache}: {args.images:,} labelled images ({files:,} files): full rescan "
                  f"{scan_wall:.3f} s wall / {scan_cpu:.3f} s CPU; bare walk "
                  f"{walk_wall:.3f} s / {walk_cpu:.3f} s")
    warm = results["warm"]["rescan_cpu_s"]
    print(f"hourly rescan: {100 * warm / 3600:.4f} % of a core")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version()}
    args.out.write_text(json.dumps({"machine": machine, "images": args.images,
                                    "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
