"""Keeps the newest data version true to the configured source.

sync() compares the source with the newest version and, when they differ, commits a new
one. For `data.source: folder`, DIR/<class>/**/<image>: files whose path, size, mtime and
inode are unchanged keep their decoded pixels; only new or changed files are decoded (in
worker processes, with the inbox's own preprocessing). Bad images are skipped with one
WARNING each; images that cannot be read now (a permission, a file still being written) wait
for a later sync, never written down as bad. A folder that is gone, or suddenly holds no
image at all (a share unmounted), never makes an empty version. For the Fashion-MNIST
sources the version is the IDX data, made once and again only if its content changes.
For a backbone model the workers compute each new photo's features, kept once per content
(daemon.data.features): a photo moved, renamed or copied is not featurized again.
Decodes in the decode workers; imports no TensorFlow. The data thread's loop is
daemon.data.follow.
"""

import logging
import os
import time

import numpy as np

from daemon import fsutil
from daemon.data import dataset, features
from daemon.data.versions import VersionStore, content, content_digest, is_validation
from daemon.inbox.sidecars import Sidecars
from daemon.training.store import CheckpointStore

log = logging.getLogger("daemon.datasource")  # the name users see: daemon.service.logs

SETTLE_SECONDS = 2.0  # where the kernel cannot tell: unchanged this long, it is complete
VERDICT_SECONDS = 30.0  # ... and this long before it is skipped as not an image
MIN_CLASSES = 2  # a first version needs two classes with images: one is no classifier


class Later(Exception):
    """The source is not ready for a version now (files still being written, unreadable,
    the folder gone); sync again after `seconds`."""

    def __init__(self, why, seconds, warn=False):
        super().__init__(why)
        self.seconds, self.warn = seconds, warn


class DataSource:
    """The configured source -> data versions in save/data/."""

    def __init__(self, config, decoder, clock=time.monotonic):
        self.config = config  # replaced by a reload (see the setter)
        self.store = VersionStore(config.save)
        self.checkpoints = CheckpointStore(config.save)
        self.decoder = decoder  # daemon.inbox.decoding.Decoder, for folder sources
        self._settling = fsutil.Settling(SETTLE_SECONDS, clock)
        self._warned = set()  # (path, size, mtime_ns) of bad images already reported
        self._gone_classes = set()
        self.retry_seconds = None  # set by sync() when images wait to be read again
        self.pending = True  # changes seen (or the start-up look) not yet in a version
        self._said_later = self._said_unlisted = self._said_twins = None
        self._said_writing = set()
        self._refreshed = (None, {})  # (version, entries): its files touched, not changed
        self._decoded = {}  # path -> (listing, (image, entry)): decoded, in no version yet
        self._damaged = set()  # versions whose arrays cannot be read: not built upon
        self._unreadable = set()  # features versions whose list of images cannot be read
        self._made, self._classes = 0, []  # the newest version made or found; its classes
        self._said_missing = None
        self.decoding = False  # the decode workers are busy (a stop need not wait for them)
        self.feature_id = None  # a backbone model's: versions hold its features (see featurize)
        self.features = None  # ... and its daemon.data.features.FeatureStore

    def featurize(self, runtime):
        """A backbone model: versions hold the features `runtime` (daemon.backbone.runtime.
        Runtime) computes in the decode workers, not pixels; versions of other features (or
        of pixels) are not built upon. Before the first sync."""
        self.decoder.featurizer = runtime
        self.feature_id = runtime.feature_id
        self.features = features.store(self.config.save, runtime.feature_id)

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, config):
        """A reload may change classify.extensions: which names are images, now."""
        self._config = config
        self.is_image_name = Sidecars(config.classify.sidecar,
                                      config.classify.extensions).is_image_name
        self.resync = True  # look again with the new settings

    def _retry_in(self, seconds):
        self.retry_seconds = min(seconds, self.retry_seconds or seconds)

    def damaged(self, number):
        """Version `number` cannot be read (the trainer found it so): make a new one from
        the source, decoding everything again. Any thread."""
        self._damaged.add(number)
        self.resync = True

    @property
    def watched(self):
        return self.config.data.path if self.config.data.source == "folder" else None

    def sync(self):
        """A new committed Version if the source changed, else None. Raises Later; sets
        retry_seconds when some images could not be read now (sync again then)."""
        self.retry_seconds = None
        if self.config.data.source == "folder":
            version = self._sync_folder()
        else:
            version = self._sync_idx()
        if version is not None:
            self._saw(version)
        return version

    def lost(self):
        """Is the version this source made or found last gone from save/data (deleted while
        running, as a cache might be)? Then sync now, to make it again. One stat."""
        return self._made > 0 and self._made != self._said_missing and \
            not self.store.has(self._made)

    def _newest(self):
        """The newest version, to compare the source with and build on; None to make a new
        one from the whole source: also when the one this source made or found last, or
        the one the newest checkpoint trained on, is missing (deleted). Its number is not
        given again, and its classes keep their order (see _classes_before)."""
        newest = self.store.newest()
        needed = max(self._made, self.checkpoints.trained_on()[0])
        if newest is not None and newest.number >= needed:
            self._saw(newest)
            return newest
        if needed and needed != self._said_missing:  # (0: none made yet, a first start)
            self._said_missing = needed
            log.warning("data version %d is missing from %s (deleted?); rebuilding it from "
                        "%s as a new version", needed, self.store.folder,
                        self.config.data.path or self.config.data.source)
        return None

    def _saw(self, version):
        self._made = max(self._made, version.number)
        if version["origin"] == "folder":
            self._classes = list(version.classes)

    def _classes_before(self, newest):
        """The classes in output order that new ones are appended to: the longest of the
        newest version's, the last made's and the newest checkpoint's (classes only grow,
        so each is the start of the next; a version made afresh keeps the model's order)."""
        candidates = [self._classes, self.checkpoints.trained_on()[1]]
        if newest is not None and newest["origin"] == "folder":
            candidates.append(newest.classes)
        return list(max(candidates, key=len))

    # ---- Fashion-MNIST (IDX) ------------------------------------------------------------------

    def _sync_idx(self):
        data = dataset.load(self.config.data.source, self.config.data.path)
        digest = data.digest(with_test=True)
        newest = self._newest()
        if newest is not None and newest.get("digest") == digest and \
                newest.number not in self._damaged:
            return None
        val = [is_validation(content_digest(image)) for image in data.x_train]
        return self.store.write(data.origin, self.config.classify.labels, data.x_train,
                                data.y_train, val, digest=digest,
                                extra_arrays={"x_test": data.x_test, "y_test": data.y_test})

    # ---- a folder of class folders ------------------------------------------------------------

    def _sync_folder(self):
        root = str(self.config.data.path)
        if not os.path.isdir(root):
            raise Later(f"{root} is not there (moved, deleted or unmounted); the data version "
                        "in use stays", 30, warn=True)
        try:
            found, ignored, unlisted = dataset.list_folder(root, self.is_image_name)
        except OSError as error:
            raise Later(f"cannot list {root}: {error.strerror}", 30, warn=True) from None
        for name in ignored:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("%s/%s: skipped (a symbolic link, not a regular file, or an "
                            "image outside a class folder)", root, name)
        newest = self._newest()
        known = {}  # path -> entry (decoded or skipped) as the newest version has them
        if self._builds_on(newest):
            known = {item["path"]: item for item in newest.get("skipped", [])}
            known.update(newest.entries())
            if self._refreshed[0] == newest.number:
                known = self._refreshed[1]
        if unlisted:
            # What a folder held that cannot be listed now stays as it was: not deleted
            self._retry_in(30)
            said = tuple(folder for folder, _ in unlisted)
            if said != self._said_unlisted:
                log.warning("cannot list %s (%s); its images stay as they were, trying again "
                            "every 30 s", ", ".join(f"{root}/{f}" for f in said),
                            unlisted[0][1])
            self._said_unlisted = said
            for path, entry in known.items():
                if any(path.startswith(folder + "/") for folder in said):
                    found.setdefault(path, (entry["class"], entry["size"], entry["mtime_ns"],
                                            entry["ino"]))
        else:
            self._said_unlisted = None
        reuse, decode = {}, []
        moved = {(e["ino"], e["size"], e["mtime_ns"]): e for e in known.values() if "sha256" in e}
        for path, (cls, size, mtime, ino) in found.items():
            old = known.get(path)
            if old and (old["class"], old["size"], old["mtime_ns"], old["ino"]) == (
                    cls, size, mtime, ino) and self._kept(old):
                reuse[path] = old
                continue
            twin = moved.get((ino, size, mtime))
            if twin is not None and self.features is not None and self._kept(twin):
                # moved or renamed (same inode, size and mtime): the same content, whose
                # features are kept; a folder reorganised is not featurized again
                reuse[path] = dict(twin, path=path, **{"class": cls})
                continue
            full = os.path.join(root, path)
            wait, why = self._settling.check(full)
            if wait:
                # Still open for writing, or not yet seen unchanged where the kernel cannot
                # tell (a share): it may be half written. It stays as it was (or out) for
                # now; the rest of the changes go on without it.
                if why == fsutil.Settling.OPEN_FOR_WRITING and path not in self._said_writing:
                    log.info("data: %s is still being written; it waits", path)
                    self._said_writing.add(path)
                self._retry_in(wait)
                if old and old["class"] == cls:
                    reuse[path] = old
            else:
                decode.append(path)
                self._said_writing.discard(path)
        if not found:
            if known:
                raise Later(f"{root} holds no image in a class folder now (a share that "
                            "is gone?); keeping the data version in use", 60, warn=True)
            raise Later(f"waiting for class folders with images in {root}", 10)
        # (a bad file deleted is no change)
        unchanged = set(reuse) == {p for p, e in known.items() if "error" not in e or p in found}
        if not decode and unchanged:
            return None
        decoded, later = self._decode(root, decode, found, known)
        if later:
            said = (len(later), later[0][0])
            if said != self._said_later:  # not the same WARNING every 30 s
                log.warning("%d training images could not be read now, trying again every "
                            "30 s (first: %s: %s)", len(later), *later[0])
            self._said_later = said
            self._retry_in(30)
        if not decoded and unchanged:
            return None  # only files that could not be read: nothing new yet
        try:
            rows = newest.arrays() if newest is not None and known and \
                self.features is None else []
        except (OSError, ValueError) as error:
            log.error("data version %d cannot be read (%s); making a new one from %s",
                      newest.number, error, root)
            self._damaged.add(newest.number)
            raise Later("rebuilding the data version", 0) from None
        return self._commit(root, newest, found, reuse, decoded, rows)

    def _decode(self, root, paths, found, known):
        """{path: (image or None if bad, entry)} for the files decoded; [(path, why)] of
        those that could not be read now. What was decoded stays at hand until a version
        holds it (a version that could not be written is not decoded again). With a
        backbone, a file of the size of a `known` entry whose features are kept may be its
        copy: the workers compare contents first and do not featurize it again."""
        later = []
        todo = [path for path in paths if self._decoded.get(path, (None,))[0] != found[path]]
        decoded = {path: self._decoded[path][1] for path in set(paths).difference(todo)}
        copies = {}
        if self.features is not None:
            sizes = {}
            for entry in known.values():
                if "sha256" in entry and self.features.has(entry["sha256"]):
                    sizes.setdefault(entry["size"], set()).add(entry["sha256"])
            copies = {os.path.join(root, path): sizes[found[path][1]] for path in todo
                      if found[path][1] in sizes}
        started = time.monotonic()
        self.decoding = True
        try:
            results = self.decoder.decode_all([os.path.join(root, p) for p in todo],
                                              known=copies) if todo else []
        finally:
            self.decoding = False
        copied = 0
        for path, (full, kind, payload) in zip(todo, results):
            cls, size, mtime, ino = found[path]
            wait = self._settling.check(full, VERDICT_SECONDS)[0] if kind == "bad" else 0.0
            if wait:  # on a share: perhaps a download that paused; a verdict only later
                later.append((path, f"{payload}; perhaps still being written"))
                self._retry_in(wait)
                continue
            if kind != "unreadable":
                self._settling.forget(full)
            if kind == "image":
                image, digest, (size, mtime, ino) = payload
                if image is None:  # a copy of an image whose features are kept
                    image = self.features.get([digest])[0]
                    copied += 1
                decoded[path] = (image, {"path": path, "class": cls, "size": size,
                                         "mtime_ns": mtime, "ino": ino, "sha256": digest})
            elif kind == "bad":
                decoded[path] = (None, {"path": path, "class": cls, "size": size,
                                        "mtime_ns": mtime, "ino": ino, "error": payload})
                if (path, size, mtime) not in self._warned:
                    self._warned.add((path, size, mtime))
                    log.warning("%s: skipped, not a usable image: %s", full, payload)
            else:
                later.append((path, payload))
                continue
            self._decoded[path] = (found[path], decoded[path])
        if todo:
            bad = sum(1 for path in todo if path in decoded and decoded[path][0] is None)
            log.info("decoded %d training images in %.1f s%s%s%s",
                     len(todo) - bad - len(later) - copied, time.monotonic() - started,
                     f"; {copied} copies of images featurized before" if copied else "",
                     f"; {bad} not usable" if bad else "",
                     f"; {len(later)} cannot be read now" if later else "")
        return decoded, later

    def _commit(self, root, newest, found, reuse, decoded, old_arrays):
        classes = self._classes_before(newest)
        entries, images, skipped = [], [], []
        for path in sorted(found):
            if path in reuse:
                entry = reuse[path]
                if "error" in entry:
                    skipped.append(entry)
                    continue
                if self.features is None:
                    images.append(old_arrays["x"][entry["row"]])
            elif path in decoded and decoded[path][0] is not None:
                if self.features is None:  # (features go to the feature store)
                    images.append(decoded[path][0])
                entry = decoded[path][1]
            else:
                if path in decoded:
                    skipped.append(decoded[path][1])
                continue
            entries.append(dict(entry, row=len(entries)))
        present = sorted({entry["class"] for entry in entries})
        new = [name for name in present if name not in classes]
        if not classes and len(present) < MIN_CLASSES:
            raise Later(f"waiting for at least {MIN_CLASSES} class folders with images in "
                        f"{root} (found: {', '.join(present) or 'none'})", 10)
        classes += new
        for name in sorted(set(classes) - set(present) - self._gone_classes):
            log.warning("class %r has no images in %s any more: it keeps its output unit "
                        "but gets no training data", name, root)
        self._gone_classes = set(classes) - set(present)
        if self._builds_on(newest) and newest.number not in self._damaged and not new and \
                content(entries) == content(newest.entries().values()):
            self._remember_touched(newest, entries, skipped)
            self._decoded.clear()
            return None
        self._warn_of_twins(entries)
        index = {name: i for i, name in enumerate(classes)}
        y = [index[entry["class"]] for entry in entries]
        val = [is_validation(entry["sha256"]) for entry in entries]
        if all(val):  # tiny: every image fell in the validation tenth
            raise Later(f"waiting for more images in {root}: all {len(val)} are held out "
                        "for validation", 10)
        if self.features is not None:
            fresh = {decoded[path][1]["sha256"]: decoded[path][0] for path in decoded
                     if decoded[path][0] is not None}
            version = self.store.write_features("folder", classes, entries, skipped,
                                                self.feature_id, newest, fresh)
            self.features.merge(self._held)
        else:
            version = self.store.write("folder", classes, np.array(images, np.uint8).reshape(
                -1, 28, 28), y, val, entries=entries, skipped=skipped)
        self._decoded.clear()
        log.info("data version %d: %d images (%d validation) in %d classes%s%s",
                 version.number, version.images, version["counts"]["validation"],
                 len(classes), f"; new: {', '.join(new)}" if new and newest else "",
                 f"; {len(skipped)} skipped" if skipped else "")
        return version

    def _kept(self, entry):
        """Is what a version holds of this entry still at hand (a backbone's features may
        have been lost with a damaged chunk: then the image is featurized again)?"""
        return self.features is None or "sha256" not in entry or \
            self.features.has(entry["sha256"])

    def _builds_on(self, newest):
        """Can a new version reuse what `newest` holds: a sound folder version of the same
        kind (pixels, or this backbone's features)? A features version the trainer could not
        use may have lost only features (a damaged chunk): its list of images is still good
        to build on, and what is missing is featurized again (see _kept)."""
        if newest is None or newest["origin"] != "folder" or \
                newest.get("features") != self.feature_id:
            return False
        if self.features is None:
            return newest.number not in self._damaged
        try:
            newest.entries()  # resolved along its chain of bases, once
        except (OSError, ValueError, KeyError, TypeError) as error:
            if newest.number not in self._unreadable:
                self._unreadable.add(newest.number)
                log.error("data version %d cannot be read (%s); making a new one from %s",
                          newest.number, error, self.config.data.path)
            return False
        return True

    def _held(self):
        """The content digests every version in save/data/ holds (their features stay)."""
        held = set()
        for number in self.store.numbers():
            version = self.store.get(number)
            if version is not None and version.get("features") == self.feature_id:
                try:
                    held.update(entry["sha256"] for entry in version.entries().values())
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # unreadable: nothing can be trained on it any more
        return held

    def _warn_of_twins(self, entries):
        """The same image in two classes teaches both labels: say so (once per example)."""
        classes_of = {}
        for entry in entries:
            classes_of.setdefault(entry["sha256"], {})[entry["class"]] = entry["path"]
        twins = [paths for paths in classes_of.values() if len(paths) > 1]
        if twins and sorted(twins[0].values()) != self._said_twins:
            self._said_twins = sorted(twins[0].values())
            log.warning("%d images are in more than one class folder (e.g. %s): each copy "
                        "teaches its own label", len(twins), " and ".join(self._said_twins))

    def _remember_touched(self, newest, entries, skipped):
        """The same images in the same classes as `newest` (files touched, renamed, copied
        over with the same content): no new version, nothing to train; their new sizes,
        mtimes and paths are kept here so they are not decoded again."""
        rows = {}
        for entry in newest.entries().values():
            rows.setdefault((entry["class"], entry["sha256"]), []).append(entry.get("row"))
        known = {entry["path"]: entry for entry in skipped}
        for entry in entries:
            row = rows[entry["class"], entry["sha256"]].pop()
            known[entry["path"]] = dict(entry, row=row) if row is not None else entry
        self._refreshed = (newest.number, known)
        log.info("data: files changed but no image or class did; data version %d stays",
                 newest.number)
