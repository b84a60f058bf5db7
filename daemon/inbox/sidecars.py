"""Sidecar files: `shoe.jpg` -> `shoe.jpg.json` (or `.txt`), written atomically.

A sidecar records the size, mtime and inode of the image it labels (`file`), so an image
replaced later (even by an older file) is seen as changed; a sidecar that is missing or
empty means: label again. No fsync per sidecar: after a power cut a lost or empty sidecar is
simply relabelled at start-up, and batches stay fast. Its `source` says who labelled it:
"model", or "person" (the review page) -- a person's label is never written over by the
model (publish_model() checks under a lock the page takes too). Sidecars written before
the review page kept the file's stat under `source`: still read.

A sidecar goes with its image: renamed along with it, removed when it is deleted -- but only
a sidecar of ours (one we can parse as ours), never a file of the user's.
"""

import json
import logging
import os
import stat
import time

from daemon import fsutil

log = logging.getLogger("daemon.sidecars")  # the name users see: daemon.service.logs
NAME_MAX = 255
MODEL, PERSON = "model", "person"
KEPT = (0, "a person's label is there: kept")  # publish_model's answer when it wrote nothing
# Errors written by versions that took an unreadable file for a bad one: look again.
_TRANSIENT_ERRORS = ("cannot open: ", "cannot read: ")


class Sidecars:
    def __init__(self, kind, extensions, observer=None):
        self.kind = kind  # "json" or "txt"
        self.suffix = "." + kind
        self.extensions = frozenset("." + ext.lower() for ext in extensions)
        # told of each sidecar of ours seen, written or gone: seen(image, record), gone(image)
        self.observer = observer

    def is_image_name(self, path):
        # Called for every file of every poll: string methods only, no os.path.
        name = path[path.rfind("/") + 1:]
        dot = name.rfind(".")
        return dot > 0 and not name.startswith(".") and name[dot:].lower() in self.extensions

    def path_for(self, image):
        return image + self.suffix

    def image_of(self, name):
        """The image name whose sidecar `name` would be, or None."""
        if name.endswith(self.suffix) and self.is_image_name(name[: -len(self.suffix)]):
            return name[: -len(self.suffix)]
        return None

    def name_too_long(self, image):
        """Why `image` cannot have a sidecar beside it, or None."""
        size = len(os.fsencode(os.path.basename(image))) + len(self.suffix)
        if size > NAME_MAX:
            return (f"its name is {size - len(self.suffix)} bytes; the sidecar's would be "
                    f"{size}, over the file system's limit of {NAME_MAX}: rename the image")
        return None

    def is_up_to_date(self, image, info=None, rewrite=False):
        """True if `image` has a valid sidecar written for its current content, or a
        person's label of this file (edited in place or not; a file replaced by another is
        labelled again); with `rewrite`, only the latter."""
        try:
            info = info or os.stat(image, follow_symlinks=False)
            text, sidecar_time = _read_regular(self.path_for(image))
        except OSError:
            return False
        if self.kind == "txt":
            return not rewrite and (text.endswith(b"\n") and len(text) > 1
                                    and sidecar_time >= info.st_mtime_ns)
        record = _record(text)
        if record is None or str(record.get("error", "")).startswith(_TRANSIENT_ERRORS):
            return False
        current = _persons_for(record, info.st_ino) or (
            not rewrite and file_of(record) == _file(info))
        if current and self.observer is not None:
            self.observer.seen(image, record)
        return current

    def written(self, image, info, result):
        """The labeller's sidecar for `image` landed: tell the observer."""
        if self.observer is not None and self.kind == "json":
            self.observer.seen(image, dict(result, source=MODEL, file=_file(info),
                                           classified_at=fsutil.utc_timestamp()))

    def read(self, image):
        """The record of `image`'s JSON sidecar of ours, or None."""
        try:
            text, _ = _read_regular(self.path_for(image))
        except OSError:
            return None
        record = _record(text)
        return record if record is not None and file_of(record) is not None else None

    def changed_since(self, image, info):
        """Was `image` (its lstat `info`) changed since its sidecar was published? Its
        ctime, which no tool can set back (exiftool -P puts the mtime back), against the
        sidecar's; True when there is no sidecar to compare with."""
        try:
            published = os.stat(self.path_for(image), follow_symlinks=False).st_ctime_ns
        except OSError:
            return True
        return info.st_ctime_ns >= published

    def _is_ours(self, sidecar):
        try:
            text, _ = _read_regular(sidecar)
        except OSError:
            return False
        if self.kind == "txt":
            return text.endswith(b"\n") and text.count(b"\n") == 1
        record = _record(text)
        return record is not None and file_of(record) is not None

    def labelled_by(self, image, errors=False):
        """Which model labelled `image`, from its sidecar: the model's id; "" for a txt
        sidecar (it does not say); None for no sidecar of ours, a person's label, or an
        error sidecar (`errors`: "" for those too)."""
        try:
            text, _ = _read_regular(self.path_for(image))
        except OSError:
            return None
        if self.kind == "txt":
            ours = text.endswith(b"\n") and text.count(b"\n") == 1
            return "" if ours and (errors or not text.startswith(b"error: ")) else None
        record = _record(text)
        if record is None or file_of(record) is None or record.get("source") == PERSON:
            return None
        if "label" not in record:
            return "" if errors else None
        return str(record.get("model", ""))

    def occupied(self, image):
        """Why the sidecar of `image` must not be written, or None: a file is there that
        the daemon did not write (a user's notes, a hand-corrected label), which is never
        overwritten. An empty file (a power cut) and a symlink (replaced, never written
        through) do not count."""
        sidecar = self.path_for(image)
        try:
            info = os.lstat(sidecar)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode) or (stat.S_ISREG(info.st_mode) and (
                info.st_size == 0 or self._is_ours(sidecar))):
            return None
        return f"{os.path.basename(sidecar)} exists and was not written by wardrobe: left as it is"

    def drop_orphan(self, image):
        """`image` was deleted or moved out: remove its sidecar, if it is ours and the image
        really is not there."""
        sidecar = self.path_for(image)
        if os.path.lexists(image):
            return
        if self.observer is not None:
            self.observer.gone(image)
        if not self._is_ours(sidecar):
            return
        try:
            os.unlink(sidecar)
            log.debug("removed %r: its image is gone", sidecar)
        except OSError:
            pass

    def follow(self, image, new_image):
        """`image` was renamed to `new_image` (same content): move its sidecar along."""
        old, new = self.path_for(image), self.path_for(new_image)
        if os.path.lexists(image) or not self._is_ours(old):
            return
        if self.name_too_long(new_image) or (os.path.lexists(new) and not self._is_ours(new)):
            self.drop_orphan(image)
            return
        try:
            os.rename(old, new)
        except OSError as error:
            log.debug("could not move %r along with its image: %s", old, error)
            self.drop_orphan(image)
            return
        if self.observer is not None:
            self.observer.gone(image)
            if (record := self.read(new_image)) is not None:
                self.observer.seen(new_image, record)

    def write(self, image, info, result):
        """Write the model's sidecar for `image` (whose stat was `info`): `result` holds
        label, class, confidence, epoch, model -- or error. Replaces, never follows, a
        symlink. None, or KEPT if a person's label is there."""
        return publish_model(self.path_for(image), self.render(info, result),
                             self.dated(info))

    def dated(self, info):
        """The mtime for the sidecar of an image whose stat is `info`, or None for now. A
        txt sidecar has no room for its image's size and mtime: it is up to date when it is
        no older than the image, so it is dated no earlier than the image's mtime, which
        may be ahead of the clock (a camera in another time zone, a NAS's clock)."""
        return max(time.time_ns(), info.st_mtime_ns) if self.kind == "txt" else None

    def render(self, info, result, now=None):
        """The bytes of a sidecar (fsutil.publish them at path_for(image))."""
        if self.kind == "txt":
            line = result["label"] if "label" in result else f"error: {result['error']}"
            return (line.replace("\n", " ") + "\n").encode()
        return self.encode(dict(result, classified_at=now or fsutil.utc_timestamp(),
                                source=MODEL, file=_file(info)))

    @staticmethod
    def person_record(info, record):
        """A person's sidecar record: `record` (label, ...) for the file `info`."""
        return dict(record, source=PERSON, file=_file(info))

    @staticmethod
    def encode(record):
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()

    @staticmethod
    def is_our_temporary(name):
        return fsutil.is_temp_name(name)


def _read_regular(path):
    """(first 64 KiB, mtime_ns) of a regular file; a symlink or FIFO there is an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, 65536), info.st_mtime_ns
    finally:
        os.close(fd)


def _record(text):
    """A JSON sidecar's record (a label or an error), or None if `text` is not one."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if isinstance(record, dict) and ("label" in record or "error" in record):
        return record
    return None


def publish_model(sidecar, data, mtime_ns=None):
    """Publish the model's sidecar `data` at `sidecar` unless a person's label of the same
    file is there; under the folder's lock, which the review page takes to write a
    person's. None, or KEPT. A plain function: the decode workers write the labeller's."""
    with fsutil.folder_lock(os.path.dirname(sidecar) or "."):
        try:
            record = _record(_read_regular(sidecar)[0])
        except OSError:
            record = None
        if record is not None and record.get("source") == PERSON:
            ours = json.loads(data) if data.startswith(b"{") else {}
            if _persons_for(record, (file_of(ours) or {}).get("inode")):
                return KEPT
        fsutil.publish(sidecar, data, mtime_ns)
    return None


def _persons_for(record, inode):
    """Is `record` a person's label of the file with this inode?"""
    return record.get("source") == PERSON and (file_of(record) or {}).get("inode") == inode


def file_of(record):
    """The image's stat as the sidecar `record` has it (`file`, or `source` before the
    review page), or None for a record that is not ours."""
    stat_ = record.get("file", record.get("source"))
    return stat_ if isinstance(stat_, dict) else None


def _file(info):
    if info is None:
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}
