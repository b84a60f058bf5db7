"""Finds the images in inbox/ that need a label, and keeps each sidecar with its image.

Changes come from the watcher (daemon.watch): inotify or polling, start-up and safety-net
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
import time

from daemon import fsutil, metrics
from daemon.watch import RESCANS, Watcher

log = logging.getLogger(__name__)

SETTLE_SECONDS = 1.0  # a file modified more recently may still be being written


class Inbox:
    def __init__(self, path, sidecars, watch, clock=time.monotonic):
        self.path = os.path.abspath(path)
        self.sidecars = sidecars
        self.clock = clock
        self.watcher = Watcher(self.path, self._wanted, watch.mode, watch.poll_seconds,
                               watch.rescan_seconds, clock=clock)
        self._scans = []  # walks in progress: generators of image paths
        self._unsettled = {}  # path -> when to look again
        self._unreadable = {}  # folder that could not be listed -> (when to try, delay)

    @property
    def root(self):
        """The real folder watched now (the configured path may be a symlink)."""
        return self.watcher.root

    def _wanted(self, name):
        return self.sidecars.is_image_name(name)

    # ---- lifecycle (the service) -------------------------------------------------------------

    def start(self):
        os.makedirs(self.path, exist_ok=True)
        self.watcher.start()

    def stop(self):
        self.watcher.stop()

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
            self.sidecars.drop_orphan(path)
            paths.pop(path, None)
            image = self.sidecars.image_of(os.path.basename(path))
            if image:  # a sidecar deleted while its image stays: label it again
                self._offer(os.path.join(os.path.dirname(path), image), paths)
        elif kind == "moved":
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
        if self.sidecars.is_image_name(path) and self._settled(path):
            paths.setdefault(path, False)

    def _due_unsettled(self):
        now, due = self.clock(), {}
        for path, when in list(self._unsettled.items()):
            if when <= now:
                del self._unsettled[path]
                if self._settled(path):
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

    def _settled(self, path):
        try:
            age = time.time() - os.lstat(path).st_mtime
        except OSError:
            return True  # the labeller reports what is wrong with it
        if age >= SETTLE_SECONDS:
            return True
        self._unsettled[path] = self.clock() + SETTLE_SECONDS - max(age, 0.0)
        return False

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
            for count, entry in enumerate(entries, 1):
                if count % 256 == 0:
                    yield None  # a huge folder, already labelled: let take() keep its budget
                if entry.is_dir(follow_symlinks=False):
                    continue  # walked next
                if self.sidecars.is_our_temporary(entry.name):
                    _remove(entry.path)
                elif self.sidecars.is_image_name(entry.name):
                    if not self.sidecars.is_up_to_date(entry.path) and self._settled(entry.path):
                        yield entry.path
                else:
                    image = self.sidecars.image_of(entry.name)
                    if image and image not in names:  # listed beside it: a real orphan
                        self.sidecars.drop_orphan(os.path.join(current, image))
            yield None


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass
