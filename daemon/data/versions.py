"""Data versions: the immutable, numbered sets of training images, kept in save/data/.

Version N is `version-N.npz` (the decoded 28x28 images `x` -- or for a backbone model their
features, the manifest naming the backbone runtime's `features` id --, their class `y`, which of them
validate `val`, and for the Fashion-MNIST sources the test set) and `version-N.json`, the
manifest: the classes in output order, one entry per source image (path, size, mtime, inode,
sha256 of its bytes, class), what was skipped and why, and the sha256 of the npz. Written as
a checkpoint is -- the arrays, fsync, then the manifest's rename commits it -- and never
changed after. Every checkpoint names the version it trained on; a version stays while a
kept checkpoint names it, so an interrupted epoch resumes on its own data even after the
images were deleted. Numbers only grow (daemon.sequence): deleting versions never makes a
later one take the number of an older one.

Validation is chosen by content: an image validates when the sha256 of its bytes falls in
one tenth of the range, so it never moves between training and validation as data grows.
Class indices only ever grow: a new class folder is appended, never sorted in.
"""

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from daemon import fsutil
from daemon.sequence import Sequence
from daemon.training.store import CheckpointStore

log = logging.getLogger("daemon.versions")  # the name users see: daemon.service.logs

FORMAT = 1
VALIDATION_SHARE = 10  # one image in ten validates
_NAME = re.compile(r"^version-(\d{8})\.(json|npz)$")


def is_validation(digest):
    """`digest`: hex sha256 of an image's content."""
    return int(digest[:8], 16) % VALIDATION_SHARE == 0


def content_digest(image):
    """For images that have no file of their own (rows of an IDX file): sha256 of the pixels."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


class Version:
    """One committed version: the manifest at hand, the arrays loaded on demand."""

    def __init__(self, folder, manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.number = manifest["version"]
        self.classes = list(manifest["classes"])

    def __getitem__(self, key):
        return self.manifest[key]

    def get(self, key, default=None):
        return self.manifest.get(key, default)

    @property
    def images(self):
        """Training and validation images together."""
        return self.manifest["counts"]["train"] + self.manifest["counts"]["validation"]

    def same_images(self, other):
        """Does `other` train on just what this one does (whatever the files are called)?"""
        return self.classes == other.classes and self.get("digest") == other.get("digest") \
            and self.get("features") == other.get("features") and content(self.entries().values()) == content(other.entries().values())

    def entries(self):
        """{relative path: entry} of a folder version (entries hold size, mtime_ns, ino,
        sha256, class name, row in the arrays)."""
        return {entry["path"]: entry for entry in self.manifest.get("entries", [])}

    def arrays(self):
        """The decoded images, checked against the manifest's digest (the newest version's
        are kept in memory by the process that wrote or read them: read-only)."""
        key = (str(self.folder), self.number)
        cached = _recent.get(key)  # (another thread may replace it meanwhile: get, once)
        if cached is not None:
            return cached
        data = (self.folder / npz_name(self.number)).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["npz"]:
            raise OSError(f"{npz_name(self.number)} does not match its checksum")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return _remember(key, {name: arrays[name] for name in arrays.files})


def content(entries):
    """What a version trains on, whatever its files are called: images' content and class."""
    return sorted((entry["class"], entry["sha256"]) for entry in entries)


class Data:
    """What the trainer uses of a version: training and validation arrays (and the test set
    where the source has one)."""

    def __init__(self, version):
        arrays = version.arrays()
        val = arrays["val"].astype(bool)
        self.version, self.classes = version, version.classes
        self.x_train, self.y_train = arrays["x"][~val], arrays["y"][~val]
        self.x_val, self.y_val = arrays["x"][val], arrays["y"][val]
        self.x_test, self.y_test = arrays.get("x_test"), arrays.get("y_test")

    def __str__(self):
        test = f", {len(self.x_test)} test" if self.x_test is not None else ""
        return (f"data version {self.version.number} ({self.version['origin']}): "
                f"{len(self.x_train)} training and {len(self.x_val)} validation images{test}, "
                f"{len(self.classes)} classes")


_recent = {}  # (folder, number) -> arrays of the version last written or read


def _remember(key, arrays):
    """Keep one version's arrays (the newest, as a rule) for the next reader: the trainer
    takes the version the data thread just wrote without reading and hashing it again."""
    for array in arrays.values():
        array.setflags(write=False)
    _recent.clear()  # one entry: a dict's single operations are atomic under the GIL
    _recent[key] = arrays
    return arrays


def manifest_name(number):
    return f"version-{number:08d}.json"


def npz_name(number):
    return f"version-{number:08d}.npz"


class VersionStore:
    def __init__(self, save):
        self.folder = Path(save) / "data"
        # Above every version a checkpoint names, even when save/data/ was emptied.
        checkpoints = CheckpointStore(save)
        self.sequence = Sequence(self.folder, ".last-version",
                                 lambda: max(checkpoints.data_versions(), default=0))

    def numbers(self):
        """Committed version numbers, newest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return self.sequence.listed(sorted((int(m.group(1)) for m in map(_NAME.match, names)
                                            if m and m.group(2) == "json"), reverse=True))

    def has(self, number):
        """Is version `number` there (its manifest, at least)? One stat."""
        return (self.folder / manifest_name(number)).exists()

    def get(self, number):
        """The committed version `number`, or None if it is missing or unreadable."""
        try:
            manifest = json.loads((self.folder / manifest_name(number)).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
                manifest.get("version") != number:
            return None
        return Version(self.folder, manifest)

    def newest(self):
        for number in self.numbers():
            version = self.get(number)
            if version is not None:
                return version
        return None

    def write(self, origin, classes, x, y, val, entries=(), skipped=(), extra_arrays=None,
              digest=None, features=None):
        """Commit a new version; returns it. `entries[i]` describes row i of x, y, val; x is
        28x28 images, or with `features` (the backbone runtime's feature_id) features."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsutil.fsync_folder(self.folder.parent)  # the new folder's own entry
        number = self.sequence.next(self.numbers())  # durable with the npz's folder fsync
        x = np.asarray(x, np.uint8).reshape(-1, 28, 28) if features is None else \
            np.asarray(x, np.float32).reshape(len(y), -1)
        arrays = dict(x=x, y=np.asarray(y, np.int32),
                      val=np.asarray(val, bool), **(extra_arrays or {}))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        npz = self.folder / npz_name(number)
        try:
            fsutil.write_new(npz, data, sync_folder=True)
        except BaseException:
            fsutil.unlink_if_present(npz)
            raise
        val = np.asarray(val, bool)
        counts = {"train": int((~val).sum()), "validation": int(val.sum()),
                  "per_class": np.bincount(np.asarray(y, np.int64),
                                           minlength=len(classes)).tolist()}
        manifest = {"format": FORMAT, "version": number, "origin": origin,
                    "classes": list(classes), "counts": counts, "npz": hashlib.sha256(data)
                    .hexdigest(), "digest": digest, "entries": list(entries),
                    "skipped": list(skipped), "written_at": fsutil.utc_timestamp()}
        if features is not None:
            manifest["features"] = features
        fsutil.write_new(self.folder / manifest_name(number),
                         json.dumps(manifest, separators=(",", ":")).encode(), sync_folder=True)
        _remember((str(self.folder), number), arrays)
        return Version(self.folder, manifest)

    def prune(self, keep):
        """Remove the versions not in `keep` (those named by kept checkpoints, the one in
        use) but the newest two, and whatever an unfinished write left. Called by the one
        thread that writes versions."""
        keep = set(keep) | set(self.numbers()[:2])
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        removed = False
        for name in names:
            match = _NAME.match(name)
            if fsutil.is_temp_name(name) or (match and int(match.group(1)) not in keep):
                fsutil.unlink_if_present(self.folder / name)
                removed = True
        if removed:
            fsutil.fsync_folder(self.folder)
