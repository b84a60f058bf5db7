"""Finds the images in inbox/ that need a label, and keeps each sidecar with its image.

Changes come from the watcher (daemon.inbox.watch): inotify or polling, start-up and safety-net
scans. An image closed after writing, moved in, linked in or seen changed is offered to the
labeller once it has settled; one renamed inside the tree takes its sidecar along (same
content, no relabelling); one deleted or moved out takes its sidecar with it. Scans walk a
folder a slice at a time, so a huge tree never holds up labelling: the first images found
are labelled while the walk goes on. Decodes nothing. Runs in the labeller's thread.
"""

import logging
import os
import queue
import stat
import threading
import time

from daemon import fsutil
from daemon.errors import AlreadyRunning
from daemon.inbox.watch import RESCANS, Watcher
from daemon.service import metrics

log = logging.getLogger("daemon.inbox")  # the name users see: daemon.service.logs

LOCK_NAME = ".wardrobe.lock"  # in the inbox: held by the daemon watching it
SETTLE_SECONDS = 1.0  # where the kernel cannot tell: unchanged this long, it is complete


class Inbox:
    def __init__(self, path, sidecars, watch, clock=time.monotonic):
        self.path = os.path.abspath(path)
        self.sidecars = sidecars
        self.clock = clock
        self.watcher = Watcher(self.path, self._wanted, watch.mode, watch.poll_seconds,
                               watch.rescan_seconds, clock=clock)
        self._scans = []  # walks in progress: generators of image paths
        self._unsettled = {}  # path -> when to look again
        self.settling = fsutil.Settling(SETTLE_SECONDS, clock)
        self._unreadable = {}  # folder that could not be listed -> (when to try, delay)
        self._lock = None  # inbox/.wardrobe.lock, held while running
        self._locking = threading.Lock()  # one taker at a time (see service: two threads try)

    @property
    def root(self):
        """The real folder watched now (the configured path may be a symlink)."""
        return self.watcher.root

    def _wanted(self, name):
        return self.sidecars.is_image_name(name)

    # ---- lifecycle (the service) -------------------------------------------------------------

    def lock(self, owner):
        """Make the inbox and hold its lock for `owner` ("PID SAVE", for the message a second
        daemon gets): AlreadyRunning if another daemon holds it."""
        with self._locking:  # the main thread's try may still be under way (a share hung)
            os.makedirs(self.path, exist_ok=True)
            if self._lock is None:
                self._lock = _lock(self.path, owner)

    def start(self, owner):
        self.lock(owner)
        self.watcher.start()

    def stop(self):
        self.watcher.stop()
        if self._lock is not None:
            self._lock.close()

    @property
    def problem(self):
        return self.watcher.problem

    def reconfigure(self, sidecars, watch):
        """New classify/watch settings (a reload): look at everything again."""
        self.sidecars = sidecars
        self.watcher.reconfigure(watch.mode, watch.poll_seconds, watch.rescan_seconds)

    def rescan(self, why, reason):
        self.watcher.rescan(why, reason)

    @property
    def scanning(self):
        return bool(self._scans)

    # ---- consuming (the labeller's thread) ----------------------------------------------------

    def take(self, limit, timeout, budget=0.2):
        """Up to `limit` image paths to label, as {path: written}: `written` when the file
        was just closed after writing (label it even if size and mtime were kept, as
        `exiftool -P` does). Waits up to `timeout` s for the first change when there is
        nothing else to do; spends at most about `budget` s."""
        started = self.clock()
        self.watcher.tick()
        self._retry_unreadable()
        paths = self._due_unsettled()
        wait = 0.0 if (paths or self._scans) else timeout
        while len(paths) < limit:
            try:
                kind, path, dest = self.watcher.changes.get(timeout=wait)
            except queue.Empty:
                break
            wait = 0.0
            if kind == "wake":  # stopping
                break
            self._handle(kind, path, dest, paths)
            if self.clock() - started > budget:
                break
        while self._scans and len(paths) < limit and self.clock() - started <= budget:
            try:
                path = next(self._scans[0])
            except StopIteration:
                self._scans.pop(0)
                continue
            if path is not None:
                paths.setdefault(path, False)
        return paths

    def _handle(self, kind, path, dest, paths):
        if kind == "written":  # closed after writing: new content
            if self.sidecars.is_image_name(path):
                paths[path] = True
        elif kind == "file":  # moved in: complete
            if self.sidecars.is_image_name(path):
                paths.setdefault(path, False)
        elif kind == "changed":  # seen by a poll: it may still be being written
            self._offer(path, paths)
        elif kind == "created":
            # A hard link, symlink or FIFO is never closed after writing: offer it now. A new
            # regular file will be, once written: wait for that.
            try:
                info = os.lstat(path)
            except OSError:
                return
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
                paths.setdefault(path, False)
        elif kind == "gone":
            self.settling.forget(path)
            self.sidecars.drop_orphan(path)
            paths.pop(path, None)
            image = self.sidecars.image_of(os.path.basename(path))
            if image:  # a sidecar deleted while its image stays: label it again
                self._offer(os.path.join(os.path.dirname(path), image), paths)
        elif kind == "moved":
            self.settling.forget(path)
            paths.pop(path, None)
            if self.sidecars.is_image_name(dest):
                self.sidecars.follow(path, dest)
                paths.setdefault(dest, False)  # renamed: complete
            else:
                self.sidecars.drop_orphan(path)
        elif kind == "scan":
            if dest in RESCANS:  # the whole inbox, not a folder just made
                metrics.rescanned(dest)
            self._scans.append(self._scan(path))

    def _offer(self, path, paths):
        if self.sidecars.is_image_name(path) and self.settled(path):
            paths.setdefault(path, False)

    def _due_unsettled(self):
        now, due = self.clock(), {}
        for path, when in list(self._unsettled.items()):
            if when <= now:
                del self._unsettled[path]
                if self.settled(path):
                    due[path] = False
        return due

    def _retry_unreadable(self):
        """A folder that could not be listed (a permission, an I/O error) is tried again with
        backoff; once it can be, watch everything anew (inotify could not watch it either)."""
        now = self.clock()
        for folder, (when, delay) in list(self._unreadable.items()):
            if when > now:
                continue
            try:
                os.listdir(folder)
            except FileNotFoundError:
                del self._unreadable[folder]
            except OSError:
                self._unreadable[folder] = (now + min(delay * 2, 30.0), min(delay * 2, 30.0))
            else:
                del self._unreadable[folder]
                log.info("%s can be read now", folder)
                self.watcher.restart(f"{folder} can be read now")

    def recheck_later(self, path, seconds):
        """The labeller found `path` still changing: look at it again after `seconds`."""
        self._unsettled[path] = self.clock() + seconds

    def settled(self, path, quiet=None):
        """Has `path` stopped changing (fsutil.Settling; `quiet` s where the kernel cannot
        tell)? If not, it is looked at again when that may have changed. Every image is
        asked before it is read, however it was found, but one just closed after writing."""
        wait, why = self.settling.check(path, quiet)
        if wait:
            log.debug("%r is %s; looking again in %.1f s", path, why, wait)
            self.recheck_later(path, wait)
        return not wait

    def _scan(self, folder):
        """Yields images below `folder` without an up-to-date sidecar (None between folders,
        so take() can stop on time); removes our stale temporaries and the sidecars whose
        image is gone. Symlinks are not followed."""
        for current, entries, error in fsutil.walk(folder):
            if isinstance(error, FileNotFoundError):
                continue
            if error is not None:
                if current not in self._unreadable:
                    log.warning("cannot scan %s: %s; will retry", current, error.strerror)
                    self._unreadable[current] = (self.clock() + 2.0, 2.0)
                continue
            names = {entry.name for entry in entries}
            if LOCK_NAME in names and current != self.root:
                holder = fsutil.lock_holder(os.path.join(current, LOCK_NAME))
                if holder is not None:  # started before us, on a folder inside ours
                    raise AlreadyRunning(f"{current}, inside {self.path}, is the inbox of "
                                         f"another wardrobe ({_owner(holder)}); give each "
                                         "daemon an inbox of its own")
            for count, entry in enumerate(entries, 1):
                if count % 256 == 0:
                    yield None  # a huge folder, already labelled: let take() keep its budget
                if entry.is_dir(follow_symlinks=False):
                    continue  # walked next
                if self.sidecars.is_our_temporary(entry.name):
                    _remove(entry.path)
                elif self.sidecars.is_image_name(entry.name):
                    if not self.sidecars.is_up_to_date(entry.path) and self.settled(entry.path):
                        yield entry.path
                else:
                    image = self.sidecars.image_of(entry.name)
                    if image and image not in names:  # listed beside it: a real orphan
                        self.sidecars.drop_orphan(os.path.join(current, image))
            yield None


def _lock(inbox, owner):
    """One daemon per inbox: two would decode every image twice and race on every sidecar.
    Refuses (AlreadyRunning) an inbox locked by another daemon, or inside one; returns the
    lock's open file, or None where no lock can be taken (said: a share without locks)."""
    folder = os.path.realpath(inbox)
    parent = os.path.dirname(folder)
    while parent != folder:  # an inbox inside another daemon's inbox is that inbox too
        folder, parent = parent, os.path.dirname(parent)
        holder = fsutil.lock_holder(os.path.join(folder, LOCK_NAME))
        if holder is not None:
            raise AlreadyRunning(f"{inbox} is inside {folder}, the inbox of another wardrobe "
                                 f"({_owner(holder)}); give each daemon an inbox of its own")
    try:
        file, holder = fsutil.lock_file(os.path.join(inbox, LOCK_NAME), owner)
    except OSError as error:
        log.warning("cannot lock %s (%s): a second daemon on the same inbox would go "
                    "unnoticed", os.path.join(inbox, LOCK_NAME), error.strerror or error)
        return None
    if file is None and holder != owner:  # (ours: taken by a call that outlived its wait)
        raise AlreadyRunning(f"{inbox} is the inbox of another wardrobe ({_owner(holder)}); "
                             "give each daemon an inbox of its own")
    return file


def _owner(holder):
    pid, _, save = holder.partition(" ")
    return f"pid {pid or '?'}, save/ {save or '?'}"


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass
