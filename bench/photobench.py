"""What the backbone benchmarks of issue 14 share: phone-sized photos made from
../shared/data/photos-sample, a converted backbone made once, the in-process ceiling
(decode on every core, then the TensorFlow Lite features), the memory of a process tree,
a systemd notify socket that records the watchdog's pings, and the daemon's log read back.

Everything made is cached under CACHE (outside git); nothing here edits daemon/.
"""

import multiprocessing
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import report
from daemonproc import REPO, log_lines

SAMPLE = REPO.parent / "shared" / "data" / "photos-sample"
CACHE = Path("/tmp/wardrobe-bench-backbone")
VERSION = "v2"  # change when the photos' look changes: a new cache folder
LONG, SHORT = 4032, 3024  # a 12-megapixel phone photo


# ---- the photos --------------------------------------------------------------------------------

def sample_photos(folder=SAMPLE):
    """[(path, class name)] of the sample's JPEGs, sorted (the placeholder gif left out)."""
    found = []
    for klass in sorted(d.name for d in Path(folder).iterdir() if d.is_dir()):
        for path in sorted((Path(folder) / klass).iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg"):
                found.append((path, klass))
    return found


def phone_photos(first, count, name="phone"):
    """[(path, class)] of phone photos number first..first+count-1, made now where missing:
    photo i is sample photo i mod N enlarged to 4032x3024 (or 3024x4032 as its aspect says),
    mirrored every other round, its brightness varied, with sensor noise; JPEG quality 90.
    Every one has its own content (the noise), as every photo of a phone has."""
    sources = sample_photos()
    folder = CACHE / f"{name}-{VERSION}"
    wanted = []
    for index in range(first, first + count):
        source, klass = sources[index % len(sources)]
        wanted.append((folder / klass / f"{klass}-{index:05d}.jpg", source, index))
    missing = [job for job in wanted if not job[0].exists()]
    if missing:
        started = time.monotonic()
        for klass in {path.parent for path, _, _ in missing}:
            klass.mkdir(parents=True, exist_ok=True)
        with _pool() as pool:
            list(pool.map(_make_photo, *zip(*missing), chunksize=4))
        print(f"made {len(missing)} phone photos in {time.monotonic() - started:.0f} s "
              f"({folder})", flush=True)
    return [(path, path.parent.name) for path, _, _ in wanted]


_noise_fields = {}


def _noise(shape):
    if shape not in _noise_fields:
        _noise_fields[shape] = np.random.default_rng(14).integers(0, 7, shape, np.uint8)
    return _noise_fields[shape]


def _make_photo(path, source, index):
    import cv2

    rng = np.random.default_rng([14, index])
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    size = (LONG, SHORT) if width >= height else (SHORT, LONG)
    image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    if (index // 245) % 2:
        image = np.ascontiguousarray(image[:, ::-1])
    # Brightness, then sensor noise: one noise field per process, shifted by the photo's
    # number (uint8 arithmetic: a 12-MP photo in well under a second)
    image = cv2.convertScaleAbs(image, alpha=rng.uniform(0.85, 1.1), beta=-3)
    image = cv2.add(image, np.roll(_noise(image.shape), index * 7919))
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data.tobytes())
    os.rename(temporary, path)  # a half-written photo is never taken for a made one


def place(photos, folder, by_class=True):
    """Hard links (same file system as CACHE) or copies of `photos` in folder/<class>/
    (or folder/ itself); their paths."""
    placed = []
    for path, klass in photos:
        target = Path(folder) / klass if by_class else Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)
        placed.append(target / path.name)
    return placed


def _pool(workers=None):
    # spawn, not fork: this process may have TensorFlow's threads running
    return ProcessPoolExecutor(workers or os.cpu_count(), multiprocessing.get_context("spawn"),
                               _init)


def _init():
    import sys

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ---- the backbone ------------------------------------------------------------------------------

def backbone_folder():
    """A folder holding backbone/ as runtime.prepare leaves it in a save/ (converted once,
    seconds, then cached): copied into a save/ it spares a daemon the conversion."""
    folder = CACHE / "prepared"
    if not (folder / "complete").exists():
        from daemon.backbone import runtime

        shutil.rmtree(folder, ignore_errors=True)
        runtime.prepare(folder, runtime.locate())
        (folder / "complete").write_text("")
    return folder


def tflite_path():
    return next((backbone_folder() / "backbone").glob("*.tflite"))


def seed_save(save):
    """save/backbone/ pre-made, as a restart finds it."""
    shutil.copytree(backbone_folder() / "backbone", Path(save) / "backbone")


# ---- the ceiling -------------------------------------------------------------------------------

_featurizer = None


def _load(path):
    from daemon.data import photos

    return photos.load(path)


def _load_and_featurize(path, model):
    global _featurizer
    from daemon.backbone.runtime import Featurizer
    from daemon.data import photos

    if _featurizer is None:
        _featurizer = Featurizer(model)
    return _featurizer(photos.load(path))


def ceiling(paths, head=None, repeats=1):
    """The in-process ceiling on `paths`: one process, decode on every core, then the
    backbone's TensorFlow Lite features, two ways, and the faster is the ceiling:
    "workers": each pool worker decodes and featurizes its photos (one interpreter thread
    each, as many workers as cores); "decode-then-features": the pool decodes, then this
    process featurizes with an interpreter of as many threads as cores. With `head` (a
    Keras model on features), its predictions are part of the work. Pool start, imports
    and the interpreters' load happen before the clock starts. Best of `repeats`."""
    from daemon.backbone.runtime import Featurizer

    model, paths = str(tflite_path()), [str(p) for p in paths]
    cores = os.cpu_count()
    local = Featurizer(model, threads=cores)
    results = {}
    with _pool(cores) as pool:
        list(pool.map(_load_and_featurize, paths[:cores], [model] * cores))  # warm
        for way in ("workers", "decode-then-features"):
            best = None
            for _ in range(repeats):
                started = time.perf_counter()
                if way == "workers":
                    features = np.stack(list(pool.map(_load_and_featurize, paths,
                                                      [model] * len(paths), chunksize=1)))
                    decoded = None
                else:
                    pixels = list(pool.map(_load, paths, chunksize=1))
                    decoded = time.perf_counter()
                    features = np.stack([local(image) for image in pixels])
                if head is not None:
                    head.predict(features, batch_size=256, verbose=0)
                seconds = time.perf_counter() - started
                if best is None or seconds < best["seconds"]:
                    best = {"seconds": round(seconds, 3),
                            "photos_per_s": round(len(paths) / seconds, 2)}
                    if decoded is not None:
                        best["decode_s"] = round(decoded - started, 3)
            results[way] = best
    way = max(results, key=lambda name: results[name]["photos_per_s"])
    return {"photos": len(paths), "cores": cores, "ways": results, "fastest": way,
            "photos_per_s": results[way]["photos_per_s"], "best_of": repeats}


# ---- watching a daemon -------------------------------------------------------------------------

def process_tree(root):
    """`root` and every living process below it (the decode workers, the resource tracker)."""
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_rss_kb(root):
    """VmRSS summed over process_tree(root), in kB; 0 once it is gone."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as file:
                fields = dict(line.split(":", 1) for line in file if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total


class TreeMemory:
    """Samples tree_rss_kb(pid) every `every` s in a thread; `peak_mb` the largest sum."""

    def __init__(self, pid, every=0.2):
        self.pid, self.every, self.peak_kb, self.samples = pid, every, 0, 0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self._running:
            kb = tree_rss_kb(self.pid)
            if kb == 0:
                break
            self.peak_kb, self.samples = max(self.peak_kb, kb), self.samples + 1
            time.sleep(self.every)

    def stop(self):
        self._running = False
        self._thread.join()
        return round(self.peak_kb / 1024)


class NotifySocket:
    """A datagram socket standing in for systemd's: the environment that makes a daemon
    send READY, STATUS and WATCHDOG pings to it (WATCHDOG_USEC as the unit sets it), and
    the wall-clock times of the pings received."""

    def __init__(self, watchdog_seconds=60):
        self.folder = tempfile.mkdtemp(prefix="wardrobe-notify-")
        self.path = os.path.join(self.folder, "notify")
        self.watchdog_seconds = watchdog_seconds
        self.pings, self.messages = [], 0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        self._socket.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def env(self):
        return {"NOTIFY_SOCKET": self.path,
                "WATCHDOG_USEC": str(int(self.watchdog_seconds * 1e6))}

    def _run(self):
        while self._running:
            try:
                message = self._socket.recv(65536).decode(errors="replace")
            except socket.timeout:
                continue
            self.messages += 1
            if "WATCHDOG=1" in message.split("\n"):
                self.pings.append(time.time())

    def largest_gap(self, start, end):
        """The longest time without a ping between `start` and `end` (wall clock)."""
        times = [start] + [t for t in self.pings if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self):
        self._running = False
        self._thread.join()
        self._socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def first_line(daemon, pattern):
    """(wall-clock time, regex match) of the first log line matching `pattern`, or None."""
    for stamp, message in log_lines(daemon):
        if match := re.search(pattern, message):
            return stamp, match
    return None


def folder_data(path):
    return {"source": "folder", "path": str(path)}


def store(out, name, result):
    """Merge `result` under `name` into the JSON file `out` (as the other benchmarks do)."""
    report.store(out, {name: result})


def table(rows):
    """rows of (measure, value, reference, ratio, goal, met) -> aligned text."""
    header = ("measure", "daemon/measured", "reference", "ratio", "goal", "met")
    cells = [header] + [tuple("" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)
