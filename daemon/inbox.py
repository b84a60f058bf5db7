"""Finds the images in inbox/ that need a label; decodes nothing.

Sources: a scan of the tree at start (images dropped while the daemon was down), then
watchdog's inotify events -- only close-after-write and moves (also in from outside), so a
file still being written is never offered, and the kernel queue carries few events. An
inotify overflow (watchdog 7 only logs it) or an observer whose thread died (e.g. inbox/
itself was deleted) turns into a new observer and a rescan, so no image is left behind.
Duplicates are fine: the labeller skips images whose sidecar is up to date.
"""

import logging
import os
import queue
import time

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent,
                             FileMovedEvent, FileSystemEventHandler)
from watchdog.observers.inotify import InotifyObserver

log = logging.getLogger(__name__)

EVENTS = [FileClosedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]
SETTLE_SECONDS = 1.0  # a scanned file modified more recently may still be being written
_WAKE = ("wake", None)


class Inbox:
    def __init__(self, root, sidecars, clock=time.monotonic):
        self.root = os.path.realpath(root)
        self.sidecars = sidecars
        self.clock = clock
        self.found = queue.Queue()  # ("file", path) | ("scan", folder) | _WAKE
        self._observer = None
        self._unsettled = {}  # path -> when to look again
        self._overflow_hook = _OverflowHook(self)
        self._observer_failure = None  # why the last restart failed

    # ---- lifecycle (called by the service) --------------------------------------------------

    def start(self):
        watchdog_log = logging.getLogger("watchdog.observers.inotify_c")
        watchdog_log.setLevel(logging.WARNING)
        watchdog_log.addHandler(self._overflow_hook)
        self._start_observer()

    def stop(self):
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self._overflow_hook)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        self.found.put(_WAKE)

    def healthy(self):
        observer = self._observer
        return bool(observer and observer.is_alive()
                    and all(emitter.is_alive() for emitter in observer.emitters))

    def _restart_observer(self):
        """After the observer died: try a new one; if that fails too, say so once and try
        again at the next take() (meanwhile healthy() is false and the watchdog waits)."""
        if not self._observer_failure:
            log.error("the inbox observer stopped; starting a new one")
        try:
            self._start_observer()
            self._observer_failure = None
        except OSError as error:
            if str(error) != self._observer_failure:
                log.error("cannot watch %s: %s", self.root, error)
            self._observer_failure = str(error)

    def _start_observer(self):
        if self._observer is not None:
            self._observer.stop()  # also stops and joins its emitters
            self._observer.join(5)
        os.makedirs(self.root, exist_ok=True)
        # Full events: a file moved in from outside the tree arrives as a move with no
        # source, not as a "created" event that a file still being written also makes.
        self._observer = InotifyObserver(generate_full_events=True)
        self._observer.name = "inbox-observer"
        self._observer.schedule(_Handler(self), self.root, recursive=True, event_filter=EVENTS)
        self._observer.start()
        self.rescan("start-up")  # after the watch exists, so nothing falls in between

    def rescan(self, why):
        if why != "start-up":
            log.warning("rescanning %s (%s)", self.root, why)
        self.found.put(("scan", self.root))

    # ---- consuming (called from the labeller's thread) --------------------------------------

    def take(self, limit, timeout):
        """Up to `limit` image paths to label (deduplicated), waiting up to `timeout` s."""
        if not self.healthy():
            self._restart_observer()
        paths = self._due_unsettled()
        deadline = self.clock() + timeout
        while len(paths) < limit:
            try:
                wait = max(0.0, deadline - self.clock()) if not paths else 0.0
                kind, path = self.found.get(timeout=wait)
            except queue.Empty:
                break
            if kind == "file":
                paths[path] = None
            elif kind == "scan":
                for image in self._scan(path):
                    paths[image] = None
            else:  # woken up (stopping)
                break
        return list(paths)

    def _due_unsettled(self):
        now, due = self.clock(), {}
        for path, when in list(self._unsettled.items()):
            if when <= now:
                del self._unsettled[path]
                if self._settled(path):
                    due[path] = None
        return due

    def _scan(self, folder):
        """Images below `folder` without an up-to-date sidecar; removes our stale temporaries.
        Symlinks are not followed."""
        stack, found = [folder], []
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as error:
                log.warning("cannot scan %s: %s", current, error.strerror)
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif self.sidecars.is_our_temporary(entry.name):
                    _remove(entry.path)
                elif self.sidecars.is_image_name(entry.path):
                    if not self.sidecars.is_up_to_date(entry.path) and self._settled(entry.path):
                        found.append(entry.path)
        return found

    def _settled(self, path):
        try:
            age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
        except OSError:
            return True  # the labeller reports what is wrong with it
        if age >= SETTLE_SECONDS:
            return True
        self._unsettled[path] = self.clock() + SETTLE_SECONDS - max(age, 0.0)
        return False

    # ---- fed by watchdog's thread: only queue puts here --------------------------------------

    def _offer(self, path):
        if self.sidecars.is_image_name(path):
            self.found.put(("file", path))


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox):
        self.inbox = inbox

    def on_closed(self, event):
        self.inbox._offer(event.src_path)

    def on_moved(self, event):
        if not event.dest_path:
            return  # moved out of the tree
        if event.is_directory:
            self.inbox.found.put(("scan", event.dest_path))
        else:
            self.inbox._offer(event.dest_path)

    def on_created(self, event):
        if event.is_directory:  # files may land in it before its watch exists
            self.inbox.found.put(("scan", event.src_path))


class _OverflowHook(logging.Handler):
    """watchdog 7 reports an inotify overflow only as a log record: turn it into a rescan."""

    def __init__(self, inbox):
        super().__init__(logging.WARNING)
        self.inbox = inbox

    def emit(self, record):
        if "overflow" in record.getMessage().lower():
            self.inbox.rescan("inotify queue overflow: events were lost")


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass
