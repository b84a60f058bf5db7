"""A person's label, from the review page: the sidecar says `"source": "person"` (the model
never writes over it, relabel included), and with a folder source the image becomes
training data of that class, hard-linked (copied across file systems) into
data.path/<label>/, where the data thread finds it for the next data version.

Done or not at all, across SIGKILL and power cuts: the whole change is first written down,
durably, as save/review/intent.json; then the training copy is made and fsynced, the
sidecar published and fsynced, and the intent removed. An intent found at start is carried
through (recover()); every step can be done twice. Corrections are taken one at a time.
"""

import errno
import json
import logging
import os
import queue
import stat
import threading

from daemon import fsutil
from daemon.inbox.sidecars import PERSON
from daemon.web.paths import Refused

log = logging.getLogger("daemon.web")

INTENT = "intent.json"
COPY_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


class Corrections:
    def __init__(self, sidecars, save, data_path=None, labels=None, classes=lambda: None):
        self.sidecars = sidecars
        self.folder = os.path.join(save, "review")
        self.data_path = None if data_path is None else str(data_path)
        self.labels = labels  # a Fashion-MNIST source: its fixed classes; a folder's: None
        self.classes = classes  # () -> the model's classes now, or None
        self.rechecks = queue.SimpleQueue()  # images whose model label is due again (undo)
        self.unfinished = False  # one written down and not carried through (a full disk)
        self._lock = threading.Lock()

    def label(self, image, label):
        """`image` (absolute, checked) is of class `label` (checked), says a person: its
        sidecar record, once durable."""
        if self.labels is not None and label not in self.labels:
            raise Refused(400, f"label: {label!r} is not one of this model's classes "
                          "(a Fashion-MNIST source has fixed classes; training on new ones "
                          "needs data.source folder)")
        with self._lock:
            info = _regular(image)
            current = self.sidecars.read(image)
            person = current is not None and current.get("source") == PERSON
            if current is not None and "error" in current:
                raise Refused(409, f"path: not an image the daemon can read "
                              f"({current['error']}): nothing to label")
            if person and current.get("label") == label:
                return current  # said before: nothing to do
            copy = None if self.data_path is None else self._copy_name(image, label, info)
            classes = self.classes() or ()
            record = self.sidecars.person_record(info, {
                "label": label, "class": classes.index(label) if label in classes else None,
                "confidence": 1.0, "epoch": None, "labelled_at": fsutil.utc_timestamp(),
                "copy": copy and os.path.relpath(copy, self.data_path), "copy_inode": None,
                "previous": current.get("previous") if person else current})
            intent = {"op": "label", "image": image, "copy": copy,
                      "remove": self._copy_of(current) if person else None, "record": record}
            self._carry_out(intent)
            log.info("%r labelled %r by a person%s", image, label,
                     f"; training copy {copy!r}" if copy else "")
            return self.sidecars.read(image)

    def undo(self, image):
        """Take a person's label of `image` back: the training copy goes, the sidecar is
        the model's again (or none, and the labeller labels it). The record now, or None."""
        with self._lock:
            current = self.sidecars.read(image)
            if current is None or current.get("source") != PERSON:
                raise Refused(409, "path: no label of a person's to undo")
            intent = {"op": "undo", "image": image, "copy": None,
                      "remove": self._copy_of(current), "record": current.get("previous")}
            self._carry_out(intent)
            log.info("%r: the person's label %r taken back", image, current.get("label"))
            self.rechecks.put(image)
            return self.sidecars.read(image)

    def finish(self):
        """Carry through a change written down but not finished (a crash, a full disk):
        at start, and again until it is done. True when none is left."""
        with self._lock:
            try:
                self._finish()
            except OSError as error:
                if not self.unfinished:
                    log.warning("review: cannot finish a correction yet: %s; will retry",
                                error)
                self.unfinished = True
                return False
            if self.unfinished:
                log.info("review: the unfinished correction is done")
            self.unfinished = False
            return True

    def _finish(self):
        path = os.path.join(self.folder, INTENT)
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else ():
            if fsutil.is_temp_name(name):  # an intent never written down: nothing was done
                fsutil.unlink_if_present(os.path.join(self.folder, name))
        try:
            with open(path) as file:
                intent = json.load(file)
        except FileNotFoundError:
            return
        except ValueError as error:  # never half written (write_new renames): not ours
            log.warning("review: ignoring %s: %s", path, error)
            os.unlink(path)
            return
        log.info("review: finishing the %s of %r", intent["op"], intent["image"])
        self._carry_out(intent, again=True)
        self.rechecks.put(intent["image"])

    def _carry_out(self, intent, again=False):
        """Do what `intent` says; first write it down (unless carried through `again`)."""
        path = os.path.join(self.folder, INTENT)
        if not again:
            try:
                self._finish()  # one left by a failure: first things first
                self.unfinished = False
            except OSError as error:
                raise Refused(503, f"an earlier correction cannot be finished yet: "
                              f"{error.strerror or error}") from None
            os.makedirs(self.folder, exist_ok=True)
            fsutil.write_new(path, json.dumps(intent).encode())  # the point of no return
        try:
            self._steps(intent, again)
        except Refused:
            os.unlink(path)  # refused before anything was done
            raise
        except OSError as error:
            if again:
                raise
            self.unfinished = True
            log.warning("review: a correction of %r is written down but cannot be finished "
                        "yet: %s; will retry", intent["image"], error)
            raise Refused(503, f"written down, to be finished when it can be: "
                          f"{error.strerror or error}") from None
        os.unlink(path)
        fsutil.fsync_folder(self.folder)

    def _steps(self, intent, again):
        image, record = intent["image"], intent["record"]
        if intent["copy"] and os.path.lexists(image):
            record["copy_inode"] = _make_copy(image, intent["copy"], self.data_path, again)
        if intent["remove"]:
            _remove_copy(*intent["remove"])
        sidecar = self.sidecars.path_for(image)
        if os.path.lexists(image):
            with fsutil.folder_lock(os.path.dirname(sidecar)):
                if record is None:
                    fsutil.unlink_if_present(sidecar)
                    fsutil.fsync_folder(os.path.dirname(sidecar))
                else:
                    fsutil.write_new(sidecar, self.sidecars.encode(record))
            if self.sidecars.observer is not None and (record := self.sidecars.read(image)):
                self.sidecars.observer.seen(image, record)

    def _copy_name(self, image, label, info):
        """Where the training copy of `image` goes: data.path/<label>/<its name>, or
        <stem>-2<ext>... when that name is another file's."""
        folder = os.path.join(self.data_path, label)
        stem, ext = os.path.splitext(os.path.basename(image))
        for number in range(1, 10000):
            name = f"{stem}{ext}" if number == 1 else f"{stem}-{number}{ext}"
            candidate = os.path.join(folder, name)
            try:
                there = os.lstat(candidate)
            except FileNotFoundError:
                return candidate
            if there.st_ino == info.st_ino and there.st_dev == info.st_dev:
                return candidate  # linked before (a correction carried through again)
        raise Refused(409, f"label: {folder} has too many files named like {stem}{ext}")

    def _copy_of(self, record):
        """[training copy, its inode] a person's sidecar `record` made, or None."""
        if self.data_path is None or not record.get("copy") or record.get("copy_inode") is None:
            return None
        return [os.path.join(self.data_path, record["copy"]), record["copy_inode"]]


def _regular(image):
    try:
        info = os.lstat(image)
    except FileNotFoundError:
        raise Refused(404, "path: no such image (gone meanwhile)") from None
    if not stat.S_ISREG(info.st_mode):
        raise Refused(404, "path: not a regular file")
    return info


def _make_copy(image, copy, data_path, again):
    """Hard-link `image` at `copy` (or copy its bytes where links cannot be made), durably;
    its inode. Carried through `again`, a copy already there is ours and kept."""
    folder = os.path.dirname(copy)
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        fsutil.fsync_folder(data_path)
    try:
        os.link(image, copy, follow_symlinks=False)
    except FileExistsError:
        if not again and not os.path.samestat(os.lstat(copy), os.lstat(image)):
            raise Refused(409, f"label: {copy} appeared meanwhile: try again") from None
    except OSError as error:
        if error.errno not in COPY_ERRNOS:
            raise
        if not os.path.lexists(copy):
            with open(image, "rb") as file:  # inbox images are at most 64 MiB (images.py)
                fsutil.write_new(copy, file.read(), sync_folder=False)
    fd = os.open(copy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # a photo just copied into the inbox may not be on disk yet
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    fsutil.fsync_folder(folder)
    return inode


def _remove_copy(copy, inode):
    """Remove the training copy a correction made, if it still is that file."""
    try:
        if os.lstat(copy).st_ino != inode:
            return  # replaced by someone: theirs now
        os.unlink(copy)
    except FileNotFoundError:
        return
    fsutil.fsync_folder(os.path.dirname(copy))
