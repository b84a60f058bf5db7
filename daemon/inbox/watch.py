"""A watched folder tree -> a queue of changes. The one watcher of the daemon: the inbox uses
it, and so will the training-data folder.

Events come from inotify (watchdog) on local file systems. On network and FUSE file systems
(NFS, SMB, sshfs, rclone, 9p, ...) files written by other machines raise no inotify event,
so there the tree is polled: each poll stats every wanted file and reports what appeared,
changed, moved (same inode, new name) or vanished. Either way the consumer also gets a
"scan" at start, after an inotify overflow, when the root folder was replaced or came back,
and every `rescan_seconds` as a safety net for anything the kernel or a bug ever missed.

A root that vanishes (renamed away, deleted, a share unmounted or suddenly empty) is never
reported as "every file deleted": the watcher says so once, waits, and rescans when a folder
is back at that path. Nothing here decodes or writes; tick() runs in the consumer's thread.
"""

import logging
import os
import queue
import stat
import time

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent,
                             FileCreatedEvent, FileDeletedEvent, FileMovedEvent,
                             FileSystemEventHandler)
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from daemon import fsutil
from daemon.mounts import choose_mode

log = logging.getLogger("daemon.watch")  # the name users see: daemon.service.logs

EVENTS = [FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent,
          DirMovedEvent, DirCreatedEvent]
RETRY_SECONDS = 2.0  # between tries to start an inotify observer that failed
MOUNT_CHECK_SECONDS = 30.0  # how often `auto` looks for a share mounted inside the tree
# Why the whole tree is walked again (a "scan" of the root, with one of these as dest; a
# folder made or moved in is scanned alone, with other words).
RESCANS = ("startup", "periodic", "reload", "reattach", "overflow", "signal")


class Watcher:
    """Watches `root` and queues changes as (kind, path, dest):
    "written" (closed after writing: new content, even if size and mtime were kept),
    "file" (moved in), "changed" (seen new or changed by a poll: may still be being
    written), "created" (a name appeared that may never be closed after writing: a hard
    link, symlink or FIFO), "gone" (deleted or moved out), "moved" (path -> dest inside the
    tree), "scan" (walk this folder, with the reason as dest). Only names for which
    `wanted(name)` holds are reported as files; folders always are."""

    def __init__(self, path, wanted, mode="auto", poll_seconds=5.0, rescan_seconds=3600.0,
                 clock=time.monotonic):
        self.path = os.path.abspath(path)  # as configured: may be a symlink, repointed later
        self.root = self.path  # the real path, from start() (in the consumer's thread: the
        # folder may be on a share that hangs, and the service's main thread makes this)
        self.wanted = wanted
        self.configured, self.poll_seconds, self.rescan_seconds = mode, poll_seconds, rescan_seconds
        self.clock = clock
        self.changes = queue.Queue()
        self.mode = self.why = None
        self._observer = None
        self._identity = None  # (st_dev, st_ino) of the root we watch; None while it is gone
        self._snapshot = {}  # polling: path -> (dev, ino, size, mtime_ns, type)
        self._next_poll = self._next_rescan = 0.0
        self._failure = None  # why the observer could not start, said once
        self._empty = False  # polling found the tree suddenly empty: waiting for it
        self._retry_at = 0.0  # when to try again an observer that could not start
        self._next_mount_check = 0.0
        self.last_problem = None  # `problem` as the last tick() saw it
        self._overflow_hook = _OverflowHook(self)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self):
        self.root = os.path.realpath(self.path)
        logging.getLogger("watchdog.observers.inotify").addHandler(self._overflow_hook)
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self._overflow_hook)
        self._attach("start-up")

    def stop(self):
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._overflow_hook)
        self._stop_observer()
        self.changes.put(("wake", None, None))

    def reconfigure(self, mode, poll_seconds, rescan_seconds):
        """New settings (a reload): watch anew if the mode changed; rescan either way."""
        changed = mode != self.configured
        self.configured, self.poll_seconds, self.rescan_seconds = mode, poll_seconds, rescan_seconds
        if changed:
            self._attach("watch.mode changed")  # rescans, and restarts both timers
        else:
            self._next_rescan = self.clock() + rescan_seconds if rescan_seconds else 0.0
            self.rescan("settings reloaded", "reload")

    @property
    def problem(self):
        """Why the tree is not being watched as it should be, or None. A root that is gone
        is not a problem of ours: we wait for it. (Looks at the folder: the service's main
        thread, which must not -- it may be on a share that hangs -- reads last_problem.)"""
        return self._observer_problem(_identity(self.path))

    def _observer_problem(self, identity):
        if self._identity is None or self.mode != "inotify":
            return None
        if identity != self._identity:
            return None  # the folder went or was replaced: tick() attends to it, not a fault
        observer = self._observer
        alive = observer and observer.is_alive() and all(e.is_alive() for e in observer.emitters)
        return None if alive else (self._failure or "the inotify observer is not running")

    # ---- called often from the consumer's thread ----------------------------------------------

    def tick(self):
        """Check the root is still the folder we watch, restart a dead observer, and run
        the poll or the safety-net rescan when due."""
        now = self.clock()
        identity = _identity(self.path)
        self.last_problem = self._observer_problem(identity)
        if identity != self._identity:
            if identity is None:
                self._stop_observer()
                self._identity = None
                log.warning("%s is gone (renamed, deleted or unmounted); waiting for it to "
                            "come back", self.path)
                return
            self._attach("back" if self._identity is None else "replaced by another folder")
            return
        if identity is None:
            return
        if self.configured == "auto" and now >= self._next_mount_check:
            self._next_mount_check = now + MOUNT_CHECK_SECONDS
            fell_back = (self.why or "").startswith("inotify failed")
            if choose_mode(self.root)[0] != self.mode and not fell_back:
                self._attach("has another file system now")  # e.g. a share mounted inside
                return
        if self.mode == "inotify" and self.last_problem:
            if now < self._retry_at:
                return
            if not self._failure:
                log.error("the inotify observer of %s stopped; starting a new one", self.root)
            self._attach("observer restarted")
        elif self.mode == "poll" and now >= self._next_poll:
            self._next_poll = now + self.poll_seconds
            self._poll()
        if self.rescan_seconds and now >= self._next_rescan:
            self._next_rescan = now + self.rescan_seconds
            self.rescan("periodic safety net", "periodic")

    def rescan(self, why, reason):
        """Walk the whole tree again; `reason`, one of RESCANS, for the metrics; `why`, the
        words for the log."""
        if reason not in ("startup", "periodic"):
            log.warning("rescanning %s (%s)", self.root, why)
        else:
            log.debug("rescanning %s (%s)", self.root, why)
        self.changes.put(("scan", self.root, reason))

    # ---- inotify or polling --------------------------------------------------------------------

    def restart(self, why):
        """Watch again from scratch (new watches for every folder), then rescan."""
        self._attach(why)

    def _attach(self, why):
        """(Re)start watching whatever folder is at the configured path now, then scan it."""
        self._stop_observer()
        self._identity = _identity(self.path)
        if self._identity is None:
            return
        self.root = os.path.realpath(self.path)
        mode, reason = choose_mode(self.root, self.configured)
        if mode == "inotify":
            try:
                self._start_observer()
                self._failure = None
            except OSError as error:  # e.g. fs.inotify.max_user_watches reached
                if self.configured == "inotify":
                    if str(error) != self._failure:
                        log.error("cannot watch %s with inotify: %s (trying again every %g s)",
                                  self.root, error, RETRY_SECONDS)
                    self._failure = str(error)
                    self.mode, self._retry_at = mode, self.clock() + RETRY_SECONDS
                    return
                mode, reason = "poll", f"inotify failed: {error}"
        if (mode, reason) != (self.mode, self.why):
            log.info("watching %s by %s: %s", self.root,
                     "polling every %g s" % self.poll_seconds if mode == "poll" else mode, reason)
        self.mode, self.why = mode, reason
        self._snapshot = self._walk_snapshot() if mode == "poll" else {}
        self._next_poll = self.clock() + self.poll_seconds
        self._next_rescan = self.clock() + self.rescan_seconds if self.rescan_seconds else 0.0
        if why == "start-up":
            self.rescan("start-up", "startup")
        else:
            self.rescan(f"{self.root} {why}",
                        "reload" if why == "watch.mode changed" else "reattach")

    def _start_observer(self):
        # Full events: a file moved in from outside the tree arrives as a move with no
        # source, not as a "created" event that a file still being written also makes.
        observer = InotifyObserver(generate_full_events=True)
        observer.name = "watch-observer"
        try:
            observer.schedule(_Handler(self), self.root, recursive=True, event_filter=EVENTS)
            observer.start()
        except BaseException:
            observer.stop()  # its inotify reader thread runs already
            raise
        self._observer = observer

    def _stop_observer(self):
        if self._observer is not None:
            self._observer.stop()  # also stops and joins its emitters
            self._observer.join(5)
            self._observer = None

    def _walk_snapshot(self, keep=None):
        """path -> stat key of every wanted file below root; a folder that cannot be listed
        keeps its entries from `keep` (a share briefly gone is not a deletion)."""
        snapshot = {}
        for folder, entries, error in fsutil.walk(self.root):
            try:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False) and self.wanted(entry.name):
                        info = entry.stat(follow_symlinks=False)
                        snapshot[entry.path] = (info.st_dev, info.st_ino, info.st_size,
                                                info.st_mtime_ns, stat.S_IFMT(info.st_mode))
            except OSError as failed:  # a file that went or cannot be read while listed
                error = failed
            if error is not None:
                prefix = folder.rstrip("/") + "/"
                snapshot.update((p, k) for p, k in (keep or {}).items() if p.startswith(prefix))
        return snapshot

    def _poll(self):
        before = self._snapshot
        now = self._walk_snapshot(keep=before)
        if before and not now:
            if not self._empty:
                log.warning("%s is suddenly empty (%d images vanished at once); taking it for "
                            "a share that went away, not deletions: waiting", self.root,
                            len(before))
                self._empty = True
            return  # keep the old snapshot: when the files are back, nothing happened
        if self._empty:
            self._empty = False
            log.info("%s has files again", self.root)
            self.rescan("files are back", "reattach")
        self._snapshot = now
        appeared = {p: k for p, k in now.items() if before.get(p) != k}
        vanished = {before[p][:2]: p for p in before if p not in now}
        for path, key in appeared.items():
            source = vanished.pop(key[:2], None)
            if source is not None and before.get(path) is None:
                self.changes.put(("moved", source, path))
            else:
                self.changes.put(("changed", path, None))
        for path in vanished.values():
            self.changes.put(("gone", path, None))


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: only queue puts here (watchdog dispatches under a lock)."""

    def __init__(self, watcher):
        self.watcher = watcher
        self.put = watcher.changes.put

    def on_closed(self, event):
        if self.watcher.wanted(os.path.basename(event.src_path)):
            self.put(("written", event.src_path, None))

    def on_created(self, event):
        if event.is_directory:  # files may land in it before its watch exists
            self.put(("scan", event.src_path, "new folder"))
        elif self.watcher.wanted(os.path.basename(event.src_path)):
            self.put(("created", event.src_path, None))

    def on_deleted(self, event):
        if not event.is_directory:
            self.put(("gone", event.src_path, None))

    def on_moved(self, event):
        if not event.dest_path:
            # moved out of the tree; a folder too (its files raise no event of their own: a
            # class folder moved out of data.path would otherwise stay in the data unnoticed)
            if not event.is_directory or \
                    os.path.normpath(event.src_path) != os.path.normpath(self.watcher.root):
                self.put(("gone", event.src_path, None))
        elif event.is_directory:
            self.put(("scan", event.dest_path, "folder moved in"))
        elif not event.src_path:
            self.put(("file", event.dest_path, None))  # moved in from outside
        else:
            self.put(("moved", event.src_path, event.dest_path))


class _OverflowHook(logging.Handler):
    """watchdog reports an inotify overflow only as a log record: turn it into a rescan."""

    def __init__(self, watcher):
        super().__init__(logging.WARNING)
        self.watcher = watcher

    def emit(self, record):
        if "overflow" in record.getMessage().lower():
            self.watcher.rescan("inotify queue overflow: events were lost", "overflow")


def _identity(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _index_move_cookies(grouper_class):
    """watchdog 7.1's move grouper finds the IN_MOVED_FROM of each IN_MOVED_TO by scanning
    its whole queue, twice, in Python: a burst of thousands of files moved in from outside
    the tree (which have no IN_MOVED_FROM at all) turns quadratic and holds the GIL for
    seconds. Knowing which cookies have an IN_MOVED_FROM pending lets it skip the scans
    when there is nothing to find; everything else is left to watchdog."""
    put_event, find = grouper_class.put_event, grouper_class.get_queued_moved_from_event
    read_event = grouper_class.read_event

    def pending(grouper):
        return grouper.__dict__.setdefault("_wardrobe_from_cookies", set())

    def indexed_put_event(self, event):
        if event.ev.is_moved_from:
            pending(self).add(event.ev.cookie)
        elif event.ev.is_moved_to:
            if event.ev.cookie not in pending(self):
                self._queue.put(event, delay=False)  # what put_event does when it finds none
                return
            pending(self).discard(event.ev.cookie)
        put_event(self, event)

    def indexed_find(self, cookie):
        return find(self, cookie) if cookie in pending(self) else None

    def indexed_read_event(self):
        event = read_event(self)
        if isinstance(event, tuple) and hasattr(event, "ev") and event.ev.is_moved_from:
            pending(self).discard(event.ev.cookie)  # left the tree: no IN_MOVED_TO will come
        return event

    grouper_class.put_event = indexed_put_event
    grouper_class.get_queued_moved_from_event = indexed_find
    grouper_class.read_event = indexed_read_event


_index_move_cookies(InotifyMoveEventGrouper)
