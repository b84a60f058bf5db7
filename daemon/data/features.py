"""The backbone's features of every training image, computed once per image content and
kept in save/features/<feature id>/ for every data version that needs them.

Append-only: features come in chunks, each `chunk-<sha256 of its bytes>.npz` holding the
sha256 of each image's content (`digests`) and its `features`. A chunk is written whole and
durably before any version names its images, and never changed after: a new photo among
10,000 costs one small chunk, not the 50 MB of all their features. A chunk's name is its
checksum, so a damaged one is known (and set aside: its images are featurized again).
Chunks are merged when they grow many, keeping only the images some version still holds.

Features are known by the runtime that computed them (daemon.backbone.runtime's feature_id):
another backbone, or one that computes other bits, has a folder of its own.
"""

import hashlib
import io
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

from daemon import fsutil

log = logging.getLogger("daemon.features")  # the name users see: daemon.service.logs

_CHUNK = re.compile(r"^chunk-([0-9a-f]{64})\.npz$")
MERGE_AT = 64  # chunks: more, and they are merged into one


class Missing(Exception):
    """Some images have no features here (a chunk deleted or damaged); `digests` says which."""

    def __init__(self, digests):
        super().__init__(f"features of {len(digests)} images are missing")
        self.digests = digests


_stores = {}  # (save folder, feature id) -> FeatureStore: one per process, shared by threads
_stores_lock = threading.Lock()


def store(save, feature_id):
    """The FeatureStore of `feature_id` in `save`, shared by the data thread (which adds)
    and the trainer (which reads): the chunks are read once."""
    key = (str(save), feature_id)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = FeatureStore(save, feature_id)
        return _stores[key]


def _locked(method):
    def locked(self, *args):
        with self._lock:
            return method(self, *args)
    locked.__doc__ = method.__doc__
    return locked


class FeatureStore:
    def __init__(self, save, feature_id):
        self.folder = Path(save) / "features" / feature_id
        self._where = None  # digest -> (chunk name, row), read at first use
        self._chunks = {}  # chunk name -> its features array, as read (verified)
        self._lock = threading.RLock()

    @_locked
    def has(self, digest):
        return digest in self._index()

    @_locked
    def missing(self, digests):
        index = self._index()
        return [digest for digest in digests if digest not in index]

    @_locked
    def get(self, digests):
        """(len(digests), features) float32 in the order given; raises Missing."""
        index = self._index()
        lost = [digest for digest in digests if digest not in index]
        if lost:
            raise Missing(lost)
        rows = [index[digest] for digest in digests]
        if not rows:
            return np.zeros((0, 0), np.float32)
        for name in {name for name, _ in rows}:
            if name not in self._chunks:
                self._load(name)
        lost = [digest for digest, (name, _) in zip(digests, rows) if name not in self._chunks]
        if lost:  # damaged, found while loading
            raise Missing(lost)
        return np.stack([self._chunks[name][row] for name, row in rows])

    @_locked
    def add(self, features):
        """Keep {digest: features} durably (those not kept already); returns how many."""
        index = self._index()
        new = {digest: vector for digest, vector in features.items() if digest not in index}
        if not new:
            return 0
        digests = sorted(new)
        array = np.stack([np.asarray(new[digest], np.float32) for digest in digests])
        name = self._write(digests, array)
        for row, digest in enumerate(digests):
            index[digest] = (name, row)
        self._chunks[name] = array
        return len(new)

    @_locked
    def merge(self, keep):
        """Merge the chunks into one holding only the digests in `keep()` (the images some
        data version still holds), once there are many. The new chunk is durable before
        the old ones go, so a crash in between leaves features twice, never none."""
        names = self._names()
        if len(names) <= MERGE_AT:
            return
        index = self._index()
        digests = sorted(digest for digest in keep() if digest in index)
        try:
            array = self.get(digests)
        except Missing:
            return  # a damaged chunk: its images are being featurized again; later
        name = self._write(digests, array) if digests else None
        for old in names:
            if old != name:
                fsutil.unlink_if_present(self.folder / old)
                self._chunks.pop(old, None)
        fsutil.fsync_folder(self.folder)
        self._where = {digest: (name, row) for row, digest in enumerate(digests)}
        if name is not None:
            self._chunks[name] = array
        log.info("merged %d feature chunks into one (%d images)", len(names), len(digests))

    def _write(self, digests, array):
        buffer = io.BytesIO()
        np.savez(buffer, digests=np.array(digests, dtype="S64"), features=array)
        data = buffer.getvalue()
        name = f"chunk-{hashlib.sha256(data).hexdigest()}.npz"
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsutil.fsync_folder(self.folder.parent)
        fsutil.write_new(self.folder / name, data, sync_folder=True)
        return name

    def _names(self):
        try:
            return sorted(name for name in os.listdir(self.folder) if _CHUNK.match(name))
        except FileNotFoundError:
            return []

    def _index(self):
        """digest -> (chunk, row) of every chunk; a chunk that cannot be read counts as
        absent (its images are featurized again)."""
        if self._where is None:
            self._where = {}
            for name in self._names():
                digests = self._load(name)
                for row, digest in enumerate(digests if digests is not None else ()):
                    self._where.setdefault(digest, (name, row))
        return self._where

    def _load(self, name):
        """Read and verify a chunk; its digests, or None if it is damaged (moved aside)."""
        path = self.folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:  # may go away: not set aside
            log.warning("cannot read %s (%s); its images are featurized again", path,
                        error.strerror)
            return None
        try:
            if hashlib.sha256(data).hexdigest() != _CHUNK.match(name).group(1):
                raise ValueError("does not match its checksum")
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                digests = [digest.decode() for digest in arrays["digests"]]
                features = arrays["features"]
        except (ValueError, KeyError, OSError) as error:
            log.warning("%s is damaged (%s); moved aside, its images are featurized again",
                        path, error)
            os.replace(path, path.with_name(name + ".damaged"))
            return None
        features.setflags(write=False)
        self._chunks[name] = features
        return digests
