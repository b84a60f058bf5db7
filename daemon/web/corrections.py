"""A person's label, from the review page: the sidecar says `"source": "person"` (the model
never writes over it, relabel included), and with a folder source the image becomes
training data of that class, hard-linked (copied across file systems) into
data.path/<label>/, where the data thread finds it for the next data version.

Done or not at all, across SIGKILL and power cuts: the whole change is first written down,
durably, as save/review/intent.json; then the training copy is made and fsynced, the
sidecar published and fsynced, and the intent removed. An intent found at start is carried
through (finish()); every step can be done twice. Corrections are taken one at a time.

The image is opened once (never through a symbolic link) and the copy is made from that
open file, so a file swapped in meanwhile is never what gets copied. Carried through later,
a correction whose image is no longer that file keeps the copy made of it (the person did
label that photo) and writes no sidecar for what is there now.
"""

import errno
import json
import logging
import os
import queue
import stat
import threading
import time

from daemon import fsutil
from daemon.data.images import MAX_FILE_BYTES
from daemon.inbox.sidecars import PERSON
from daemon.web.paths import Refused, open_beneath

log = logging.getLogger("daemon.web")

INTENT = "intent.json"
RETRY_SECONDS = 10  # an unfinished correction (a full disk) is tried again this often
COPY_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES,
               errno.ENOENT}  # ENOENT: no /proc (then a byte copy)
GONE_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR}  # not the file it was: final


class Changed(Exception):
    """The image is no longer the file the correction was about."""


class Corrections:
    def __init__(self, sidecars, save, root, data_path=None, labels=None,
                 classes=lambda: None):
        self.sidecars = sidecars
        self.root = root  # the inbox's real path: images are opened beneath it
        self.folder = os.path.join(save, "review")
        self.data_path = None if data_path is None else str(data_path)
        self.labels = labels  # a Fashion-MNIST source: its fixed classes; a folder's: None
        self.classes = classes  # () -> the model's classes now, or None
        self.rechecks = queue.SimpleQueue()  # images whose model label is due again (undo)
        self.unfinished = False  # one written down and not carried through (a full disk)
        self._lock = threading.Lock()
        self._tried = time.monotonic()

    @classmethod
    def of(cls, config, sidecars, classes=lambda: None):
        """The corrections of a daemon run with `config`: a folder source trains on them,
        a Fashion-MNIST source keeps them in the sidecars, for its fixed classes."""
        folder = config.data.source == "folder"
        return cls(sidecars, config.save, os.path.realpath(config.inbox),
                   data_path=config.data.path if folder else None,
                   labels=None if folder else list(config.classify.labels), classes=classes)

    def label(self, image, label):
        """`image` (absolute, checked) is of class `label` (checked), says a person: its
        sidecar record, once durable; Refused if it cannot be."""
        if self.labels is not None and label not in self.labels:
            raise Refused(400, f"label: {label!r} is not one of this model's classes "
                          "(a Fashion-MNIST source has fixed classes; training on new ones "
                          "needs data.source folder)")
        if why := self.sidecars.name_too_long(image):
            raise Refused(409, f"path: {why}")
        with self._lock, _opened(self.root, image) as (fd, info):
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
            intent = {"op": "label", "image": image, "file": [info.st_dev, info.st_ino],
                      "copy": copy, "remove": self._copy_of(current) if person else None,
                      "record": record}
            self._carry_out(intent, fd)
            log.info("%r labelled %r by a person%s", image, label,
                     f"; training copy {copy!r}" if copy else "")
            return self.sidecars.read(image)

    def undo(self, image):
        """Take a person's label of `image` back: the training copy goes, the sidecar is
        the model's again (or none, and the labeller labels it). The record now, or None."""
        with self._lock, _opened(self.root, image) as (fd, info):
            current = self.sidecars.read(image)
            if current is None or current.get("source") != PERSON:
                raise Refused(409, "path: no label of a person's to undo")
            intent = {"op": "undo", "image": image, "file": [info.st_dev, info.st_ino],
                      "copy": None, "remove": self._copy_of(current),
                      "record": current.get("previous")}
            self._carry_out(intent, fd)
            log.info("%r: the person's label %r taken back", image, current.get("label"))
            self.rechecks.put(image)
            return self.sidecars.read(image)

    def finish(self):
        """Carry through a change written down but not finished (a crash, a full disk):
        at start, and again (due()) until it is done. True when none is left."""
        with self._lock:
            self._tried = time.monotonic()
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

    def due(self):
        """{image: False} for the labeller: images whose person's label was taken back, or
        whose correction was finished late; an unfinished correction is tried again first
        (at most every RETRY_SECONDS)."""
        if self.unfinished and time.monotonic() - self._tried >= RETRY_SECONDS:
            self.finish()
        due = {}
        while not self.rechecks.empty():
            due[self.rechecks.get()] = False
        return due

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
        try:
            with _opened(self.root, intent["image"], intent["file"]) as (fd, _):
                self._steps(intent, fd, again=True)
        except Changed as why:  # the copy made of it stays; an undo's copy still goes
            log.warning("review: %r is no longer the file its %s was about (%s): no "
                        "sidecar written", intent["image"], intent["op"], why)
            if intent["op"] == "undo" and intent["remove"]:
                _remove_copy(*intent["remove"])
        self._done(path)
        self.rechecks.put(intent["image"])

    def _carry_out(self, intent, fd):
        """Write `intent` down, then do it."""
        path = os.path.join(self.folder, INTENT)
        try:
            self._finish()  # one left by a failure: first things first
            self.unfinished = False
        except OSError as error:
            raise Refused(503, f"an earlier correction cannot be finished yet: "
                          f"{error.strerror or error}") from None
        os.makedirs(self.folder, exist_ok=True)
        fsutil.write_new(path, json.dumps(intent).encode())  # the point of no return
        try:
            self._steps(intent, fd)
        except Refused:
            os.unlink(path)  # refused before anything was done
            raise
        except OSError as error:
            self.unfinished = True
            log.warning("review: a correction of %r is written down but cannot be finished "
                        "yet: %s; will retry", intent["image"], error)
            raise Refused(202, f"written down, to be finished when it can be: "
                          f"{error.strerror or error}") from None
        self._done(path)

    def _done(self, path):
        os.unlink(path)
        fsutil.fsync_folder(self.folder)

    def _steps(self, intent, fd, again=False):
        image, record = intent["image"], intent["record"]
        if intent["copy"]:
            record["copy_inode"] = _make_copy(fd, intent["copy"], self.data_path, again)
        if intent["remove"]:
            _remove_copy(*intent["remove"])
        sidecar = self.sidecars.path_for(image)
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
        <stem>-2<ext>... when that name is another file's; the name it is linked under
        already, if it is (renamed in the inbox meanwhile)."""
        folder = os.path.join(self.data_path, label)
        if os.path.lexists(folder) and os.path.realpath(folder) != folder:
            raise Refused(409, f"label: {folder} is a symbolic link: not written through")
        if os.path.isdir(self.data_path):
            for entry in os.scandir(self.data_path):
                if entry.name != label and entry.name.casefold() == label.casefold():
                    raise Refused(409, f"label: the class {entry.name!r} differs from "
                                  f"{label!r} in case only: use it, or another name")
        if info.st_nlink > 1 and os.path.isdir(folder):  # a link of it there already?
            for entry in os.scandir(folder):
                if entry.inode() == info.st_ino and entry.is_file(follow_symlinks=False):
                    return entry.path
        stem, ext = os.path.splitext(os.path.basename(image))
        for number in range(1, 10000):
            candidate = os.path.join(folder, f"{stem}{ext}" if number == 1
                                     else f"{stem}-{number}{ext}")
            if not os.path.lexists(candidate):
                return candidate
        raise Refused(409, f"label: {folder} has too many files named like {stem}{ext}")

    def _copy_of(self, record):
        """[training copy, its inode] a person's sidecar `record` made, or None."""
        if self.data_path is None or not record.get("copy") or record.get("copy_inode") is None:
            return None
        return [os.path.join(self.data_path, record["copy"]), record["copy_inode"]]


class _opened:
    """Within: (fd, fstat) of the regular file `image`, opened without following a symbolic
    link; with `file` ([st_dev, st_ino]), Changed unless it is that file. Refused when a
    request names what cannot be an image; Changed (final) or OSError (may go away) when a
    correction is carried through again."""

    def __init__(self, root, image, file=None):
        self.root, self.image, self.file = root, image, file

    def __enter__(self):
        again = self.file is not None
        try:
            self.fd = open_beneath(self.root, self.image)
        except OSError as error:
            if error.errno not in GONE_ERRNOS | {errno.EXDEV}:
                raise
            if again:
                raise Changed(error.strerror) from None
            raise Refused(404, "path: no such image (gone meanwhile, or a symbolic link)") \
                from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode) or (again and [info.st_dev, info.st_ino] != self.file):
            os.close(self.fd)
            if again:
                raise Changed("another file")
            raise Refused(404, "path: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            os.close(self.fd)
            if again:
                raise Changed("grown too large")
            raise Refused(413, f"path: over {MAX_FILE_BYTES} bytes: not an image to train on")
        return self.fd, info

    def __exit__(self, *_):
        os.close(self.fd)


def _make_copy(fd, copy, data_path, again):
    """Hard-link the open file `fd` at `copy` (or copy its bytes where links cannot be
    made), durably; its inode. Carried through `again`, a copy already there is ours."""
    folder = os.path.dirname(copy)
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        fsutil.fsync_folder(data_path)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # the open file itself, whatever its name is now: a dir fd makes os.link use
        # linkat(AT_SYMLINK_FOLLOW) on the /proc fd link (plain link() would not follow it)
        os.link(f"/proc/self/fd/{fd}", copy, src_dir_fd=folder_fd, follow_symlinks=True)
    except FileExistsError:
        if not again and not os.path.samestat(os.lstat(copy), os.fstat(fd)):
            raise Refused(409, f"label: {copy} appeared meanwhile: try again") from None
    except OSError as error:
        if error.errno not in COPY_ERRNOS:
            raise
        if not os.path.lexists(copy):
            size = os.fstat(fd).st_size  # at most MAX_FILE_BYTES: checked when opened
            fsutil.write_new(copy, os.pread(fd, size, 0), sync_folder=False)
    finally:
        os.close(folder_fd)
    copied = os.open(copy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(copied)  # a photo just copied into the inbox may not be on disk yet
        inode = os.fstat(copied).st_ino
    finally:
        os.close(copied)
    fsutil.fsync_folder(folder)
    return inode


def _remove_copy(copy, inode):
    """Remove the training copy a correction made, if it still is that file; and its class
    folder if that leaves it empty (a class named by mistake goes with its last image)."""
    try:
        if os.lstat(copy).st_ino != inode:
            return  # replaced by someone: theirs now
        os.unlink(copy)
    except FileNotFoundError:
        return
    folder = os.path.dirname(copy)
    fsutil.fsync_folder(folder)
    try:
        os.rmdir(folder)
        fsutil.fsync_folder(os.path.dirname(folder))
    except OSError:
        pass  # other images in it
