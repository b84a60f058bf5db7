"""Data versions: the immutable, numbered sets of training images, kept in save/data/.

Version N is `version-N.npz` (the decoded 28x28 images `x`, their class `y`, which of them
validate `val`, and for the Fashion-MNIST sources the test set) and `version-N.json`, the
manifest: the classes in output order, one entry per source image (path, size, mtime, inode,
sha256 of its bytes, class), what was skipped and why, and the sha256 of the npz. Written as
a checkpoint is -- the arrays, fsync, then the manifest's rename commits it -- and never
changed after.

A backbone model's version (format 2) holds no arrays: its images' features are kept once
per image content in daemon.data.features, and its manifest records only what changed since
a base version (a full list every MAX_DEPTH versions, or when shorter); its rows are its
entries in path order. Every checkpoint names the version it trained on; a version stays while a
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
from daemon.data import features
from daemon.sequence import Sequence
from daemon.training.store import CheckpointStore

log = logging.getLogger("daemon.versions")  # the name users see: daemon.service.logs

FORMAT = 1  # pixels: the arrays in version-N.npz
FEATURES_FORMAT = 2  # a backbone's: what changed, the features in daemon.data.features
MAX_DEPTH = 16  # a features version names at most this many bases before a full one
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
        self._entries = None

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
            and self.get("features") == other.get("features") \
            and content(self.entries().values()) == content(other.entries().values())

    def entries(self):
        """{relative path: entry} of a folder version (entries hold size, mtime_ns, ino,
        sha256, class name, and in a pixels version the row in the arrays). A features
        version records what changed since its base: resolved here, along the chain."""
        if self._entries is None:
            if self.get("format") != FEATURES_FORMAT:
                self._entries = {entry["path"]: entry for entry in self.get("entries", [])}
            else:
                self._entries = self._resolved()
        return self._entries

    def _resolved(self):
        entries = {}
        if self["base"] is not None:
            base = _read(self.folder, self["base"])
            if base is None:
                raise OSError(f"data version {self['base']}, the base of version "
                              f"{self.number}, is missing or unreadable")
            entries = dict(base.entries())
        for path in self["removed"]:
            entries.pop(path, None)
        entries.update((entry["path"], entry) for entry in self["added"])
        if _content_digest(entries.values()) != self["content"]:
            raise OSError(f"data version {self.number} does not match its checksum")
        return entries

    def arrays(self):
        """The decoded images (or features), checked against the manifest (the newest
        version's are kept in memory by the process that wrote or read them: read-only).
        A features version's rows are its entries in path order."""
        key = (str(self.folder), self.number)
        cached = _recent.get(key)  # (another thread may replace it meanwhile: get, once)
        if cached is not None:
            return cached
        if self.get("format") == FEATURES_FORMAT:
            entries = [entry for _, entry in sorted(self.entries().items())]
            index = {name: i for i, name in enumerate(self.classes)}
            digests = [entry["sha256"] for entry in entries]
            try:
                x = features.store(self.folder.parent, self["features"]).get(digests)
            except features.Missing as error:
                raise OSError(str(error)) from None
            return _remember(key, {
                "x": x.reshape(len(entries), -1),
                "y": np.array([index[entry["class"]] for entry in entries], np.int32),
                "val": np.array([is_validation(digest) for digest in digests], bool)})
        data = (self.folder / npz_name(self.number)).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["npz"]:
            raise OSError(f"{npz_name(self.number)} does not match its checksum")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return _remember(key, {name: arrays[name] for name in arrays.files})


def _content_digest(entries):
    """sha256 of what a features version holds: each image's path, class and content."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda entry: entry["path"]):
        digest.update(f"{entry['path']}\0{entry['class']}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()


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


_versions = {}  # (folder, number) -> Version: the few read last (versions never change)


def _read(folder, number):
    key = (str(folder), number)
    version = _versions.get(key)
    if version is not None:
        return version
    try:
        manifest = json.loads((Path(folder) / manifest_name(number)).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") not in (
            FORMAT, FEATURES_FORMAT) or manifest.get("version") != number:
        return None
    version = Version(folder, manifest)
    if len(_versions) >= 2 * MAX_DEPTH:
        _versions.clear()
    _versions[key] = version
    return version


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
        return _read(self.folder, number)

    def newest(self):
        for number in self.numbers():
            version = self.get(number)
            if version is not None:
                return version
        return None

    def write(self, origin, classes, x, y, val, entries=(), skipped=(), extra_arrays=None,
              digest=None):
        """Commit a new version; returns it. `entries[i]` describes row i of x, y, val."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsutil.fsync_folder(self.folder.parent)  # the new folder's own entry
        number = self.sequence.next(self.numbers())  # durable with the npz's folder fsync
        arrays = dict(x=np.asarray(x, np.uint8).reshape(-1, 28, 28), y=np.asarray(y, np.int32),
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
        fsutil.write_new(self.folder / manifest_name(number),
                         json.dumps(manifest, separators=(",", ":")).encode(), sync_folder=True)
        _remember((str(self.folder), number), arrays)
        return Version(self.folder, manifest)

    def write_features(self, origin, classes, entries, skipped, feature_id, base=None,
                       new_features=None):
        """Commit a new version of a backbone's features; returns it. `new_features`
        ({sha256: features}) are kept first; the manifest records what changed since `base`
        (a features version of the same backbone), or all entries when that is shorter or
        the chain of bases long: adding a photo to 10,000 writes a kilobyte or two."""
        if new_features:
            features.store(self.folder.parent, feature_id).add(new_features)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsutil.fsync_folder(self.folder.parent)
        entries = [{key: value for key, value in entry.items() if key != "row"}
                   for entry in entries]
        added, removed, depth = entries, [], 0
        if base is not None and base.get("format") == FEATURES_FORMAT and \
                base.get("features") == feature_id and base.get("depth", 0) < MAX_DEPTH:
            old = base.entries()
            paths = {entry["path"] for entry in entries}
            changes = [entry for entry in entries if old.get(entry["path"]) != entry]
            gone = sorted(set(old) - paths)
            if len(changes) + len(gone) < len(entries) // 2:
                added, removed, depth = changes, gone, base.get("depth", 0) + 1
        if not depth:
            base = None
        number = self.sequence.next(self.numbers())
        val = [is_validation(entry["sha256"]) for entry in entries]
        index = {name: i for i, name in enumerate(classes)}
        counts = {"train": len(val) - sum(val), "validation": sum(val),
                  "per_class": np.bincount([index[entry["class"]] for entry in entries],
                                           minlength=len(classes)).tolist()}
        manifest = {"format": FEATURES_FORMAT, "version": number, "origin": origin,
                    "classes": list(classes), "counts": counts, "features": feature_id,
                    "base": base.number if base is not None else None, "depth": depth,
                    "added": added, "removed": removed,
                    "content": _content_digest(entries), "skipped": list(skipped),
                    "written_at": fsutil.utc_timestamp()}
        fsutil.write_new(self.folder / manifest_name(number),
                         json.dumps(manifest, separators=(",", ":")).encode(), sync_folder=True)
        return _read(self.folder, number)

    def prune(self, keep):
        """Remove the versions not in `keep` (those named by kept checkpoints, the one in
        use) but the newest two, and the bases they are written against, and whatever an
        unfinished write left. Called by the one thread that writes versions."""
        keep = set(keep) | set(self.numbers()[:2])
        for number in [number for number in keep if isinstance(number, int)]:
            version = self.get(number)
            while version is not None and version.get("base") is not None:
                keep.add(version["base"])
                version = self.get(version["base"])
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
