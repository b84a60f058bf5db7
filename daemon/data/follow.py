"""The data thread's loop: sync the data source at start, then whenever its folder changes
(watched as the inbox is, daemon.inbox.watch), when a sync asked to be retried, and when
the newest version went missing; each new version is handed on. Runs in the service's data
thread; the sync itself is daemon.data.datasource's.
"""

import logging
import queue
import time

from daemon.data.datasource import Later
from daemon.inbox.watch import Watcher

log = logging.getLogger("daemon.datasource")  # the name users see: daemon.service.logs

QUIET_SECONDS = 0.5  # changes come in bursts (a folder copied in): sync once they pause
MAX_DELAY_SECONDS = 30.0  # ... but never wait longer than this while they go on
LOST_CHECK_SECONDS = 5.0  # how often to look whether the newest version was deleted


def follow(source, watch, stop_event, keep, on_version, clock=time.monotonic):
    """Run in the data thread: sync at start, then whenever the watched folder changes (and
    when a sync asked to be retried), until stop_event. `keep()` names the versions still
    needed (kept checkpoints', the trainer's); `on_version(version)` is told of each new one."""
    watcher = None
    if source.watched is not None:
        watcher = Watcher(str(source.watched), lambda name: source.is_image_name(name),
                          watch.mode, watch.poll_seconds, watch.rescan_seconds, clock=clock)
        watcher.start()
    source.store.prune(keep())  # what a killed run's write left
    source.pending = True
    due, first_change, said = clock(), None, None
    checked = due
    source.resync = False
    try:
        while not stop_event.is_set():
            now = clock()
            if now >= checked + LOST_CHECK_SECONDS:
                checked = now
                if due is None and source.lost():
                    due = now
            if source.resync:  # reloaded
                source.resync, due = False, now
                if watcher is not None and source.config.watch != watch:
                    watch = source.config.watch
                    watcher.reconfigure(watch.mode, watch.poll_seconds, watch.rescan_seconds)
            if due is not None and now >= due:
                due, first_change = None, None
                try:
                    version = source.sync()
                except Later as why:
                    due = now + why.seconds
                    source.pending = why.seconds <= 1  # a file about to be complete
                    if str(why) != said:
                        log.log(logging.WARNING if why.warn else logging.INFO, "data: %s", why)
                    said = str(why)
                except OSError as error:  # save/ full or read-only: may go away
                    if stop_event.is_set():
                        return
                    due = now + 30
                    source.pending = False
                    log.warning("data: cannot write a data version (%s); trying again in "
                                "30 s", error)
                except Exception:
                    if stop_event.is_set():
                        return  # the decode workers were stopped under a sync: nothing lost
                    raise
                else:
                    said, source.pending = None, False
                    if source.retry_seconds:
                        due = now + source.retry_seconds
                    if version is not None:
                        source.store.prune(keep())
                        on_version(version)
            if watcher is None:
                stop_event.wait(0.5 if due is None else max(0.0, min(0.5, due - clock())))
                continue
            watcher.tick()
            try:
                change = watcher.changes.get(timeout=0.5)
            except queue.Empty:
                continue
            if change[0] == "wake":
                continue
            now = clock()
            first_change = first_change or now
            due = min(now + QUIET_SECONDS, first_change + MAX_DELAY_SECONDS)
            source.pending = True
    finally:
        if watcher is not None:
            watcher.stop()
