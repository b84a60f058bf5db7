"""Turns image paths into sidecars: stat, decode on every core (daemon.inbox.decoding), one batched
predict, sidecars rendered here and written atomically by the same worker processes. Runs
in one thread, the service's.

Work is bounded in time, not count: a step waits for decoded images for at most
STEP_SECONDS and then labels what it has, so sidecars stream out of a backlog of photos
instead of appearing all at the end, and the service's loop keeps coming round.

Only a verdict about a file's content is final (an error sidecar), and only once the file
is no longer being written (no process has it open for writing, or, where the kernel cannot
tell, we saw it unchanged for QUIET_SECONDS); anything that can go away by itself -- a full
disk, a permission, an I/O error, a read-only file system, a file still being written -- is
retried with backoff, without a restart. A decode worker that dies (a crash, the OOM killer)
is replaced and its work redone; only a file that kills one on its own gets an error. A
name too long to have a sidecar beside it is said once and counted.
"""

import concurrent.futures
import errno
import logging
import os
import time
from concurrent.futures.process import BrokenProcessPool

from daemon import fsutil
from daemon.inbox.relabel import stale
from daemon.inbox.sidecars import KEPT
from daemon.service import metrics

log = logging.getLogger("daemon.labeller")  # the name users see: daemon.service.logs

STEP_SECONDS = 0.5
QUIET_SECONDS = 30.0  # where the kernel cannot tell: unchanged this long before an error
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
MAX_BATCH = 2048
WRITE_CHUNK = 256  # sidecars a worker writes per task


class Labeller:
    def __init__(self, sidecars, classifier, decoder, inbox, clock=time.monotonic):
        self.sidecars = sidecars
        self.classifier = classifier
        self.decoder = decoder
        self.inbox = inbox
        self.clock = clock
        self.pending = {}  # path -> written (label even if it looks up to date): to decode
        self.in_flight = {}  # future -> {path: stat before decoding}
        self.writing = {}  # future -> {path: (stat, result)}: sidecars being written
        self.retry = {}  # path -> (when, delay): failed for a reason that can go away
        self.cannot = {}  # path -> why it can never have a sidecar (said once)
        self.counts = {"label": 0, "error": 0}
        self.found = {}  # path -> clock() when first offered: the label latency starts there
        self._flying = set()  # paths being decoded or written: one at a time per image
        self._deferred = {}  # path -> written: came again while in flight; sent round after
        self._suspects = {}  # path -> deaths while alone in the pool: in flight when one died
        self._folders = {}  # folder -> inside the inbox without symlinks (per step)
        self.relabelling = None  # `wardrobe relabel`: paths still to rewrite
        self._walk = None  # ... and the walk that finds them, while it goes on
        self.relabelled = 0
        self.summary = self._summary()  # read by the service's thread: replaced, never changed

    def _summary(self):
        for path in [p for p in self.cannot if not os.path.lexists(p)]:
            del self.cannot[path]  # renamed or deleted since
        backlog = len(self.pending) + sum(map(len, self.in_flight.values())) + sum(
            map(len, self.writing.values()))
        metrics.inbox(backlog, len(self.retry), len(self.cannot))
        if not (backlog or self.retry or self._deferred):
            self.found.clear()  # a file that went while it was still being written, say
        return {"labelled": self.counts["label"], "errors": self.counts["error"],
                "backlog": backlog, "retrying": len(self.retry),
                "cannot_label": len(self.cannot)}

    def relabel(self, everything):
        """Label again the images whose sidecar another model wrote (all with `everything`):
        found a slice at a time by relabel_finished(), so a huge inbox never holds up the
        labeller. Only once classifier.refresh() holds."""
        self._walk = stale(self.inbox.root, self.sidecars, self.classifier.generation.id,
                           everything)
        self.relabelling, self.relabelled = set(), 0

    def relabel_finished(self, seconds=0.2):
        """Look for images to relabel for up to `seconds`; once all are found and each was
        written or is waiting for a retry: (rewritten, waiting for a retry). None before."""
        if self._walk is not None:
            deadline = self.clock() + seconds
            for path in self._walk:
                self.relabelling.add(path)
                self.pending[path] = True
                if self.clock() > deadline:
                    return None
            self._walk = None
        busy = set(self.pending) | self._flying | set(self._deferred)
        self.relabelling &= busy | set(self.retry)  # gone, or cannot: not waited for
        if self.relabelling - set(self.retry):
            return None
        return self.relabelled, len(self.relabelling)

    def add(self, paths):
        """`paths`: {path: written}, as Inbox.take() gives them."""
        now = self.clock()
        for path, written in paths.items():
            self.pending[path] = self.pending.get(path, False) or written
            self.retry.pop(path, None)
            self.found.setdefault(path, now)

    def step(self):
        """Decode for up to STEP_SECONDS, label what came back, have the sidecars written;
        returns how many were written."""
        deadline = self.clock() + STEP_SECONDS
        self._due_retries()
        busy = self.pending or self.in_flight or self.writing
        if not busy or not self.classifier.refresh():
            self.summary = self._summary()
            return 0  # nothing to do, or no checkpoint to label with yet
        self._folders = {}
        results, written = [], 0
        while True:
            self._submit()
            if not (self.in_flight or self.writing):
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            done, _ = concurrent.futures.wait([*self.in_flight, *self.writing],
                                              timeout=remaining,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                if future in self.writing:
                    written += self._written(future)
                    continue
                chunk = self.in_flight.pop(future)
                self._landed(chunk)
                try:
                    decoded = future.result()
                except BrokenProcessPool:
                    self._worker_died(chunk)
                    break
                self.decoder.measured(decoded)
                results += [(path, chunk[path], kind, payload)
                            for path, kind, payload, _ in decoded]
            if results and (len(results) >= MAX_BATCH or not self.in_flight):
                self._finish(results)
                results = []
        if results:
            self._finish(results)
        if (self.in_flight or self.writing) and self.decoder.lost():
            self._worker_died({})  # killed while sending its results: the pool never knew
        self.summary = self._summary()
        return written

    # ---- decoding ----------------------------------------------------------------------------

    def _submit(self):
        """Keep two chunks per worker in flight. What was in flight when a worker died is
        suspect: each goes alone, with nothing else in the pool, so that a worker dying then
        is its doing (or, rarely, a killer's: it takes two such deaths for a verdict)."""
        while self.pending and len(self.in_flight) < 2 * self.decoder.workers:
            suspects = [path for path in self._suspects if path in self.pending]
            if suspects and (self.in_flight or self.writing):
                return  # until the pool is empty
            probing = bool(suspects)
            chunk, size = {}, 1 if probing else self.decoder.chunk_size()
            while self.pending and len(chunk) < size:
                path = suspects.pop(0) if suspects else next(iter(self.pending))
                info = self._ready(path, self.pending.pop(path))
                if info is None:
                    self._suspects.pop(path, None)
                else:
                    chunk[path] = info
            if not chunk:
                continue
            try:
                self.in_flight[self.decoder.submit(list(chunk))] = chunk
            except BrokenProcessPool:  # a worker died (killed, say) since the last step
                self.pending.update((path, True) for path in chunk)
                self._worker_died({})
                continue
            self._flying.update(chunk)
            if probing:
                return  # a suspect alone

    def _ready(self, path, written):
        """lstat of `path` if it needs a label and can have one, else None. One in flight
        already is not sent again: if it changes meanwhile, _unchanged() sends it round."""
        if path in self._flying:
            self._deferred[path] = self._deferred.get(path, False) or written
            return None
        info = self._stat_inside(path)
        if info is None:
            self.retry.pop(path, None)  # gone, or not ours to label
            self.found.pop(path, None)
            return None
        if info is False:
            return None  # retried
        # Written (closed after writing): labelled even if size and mtime were kept, unless
        # the write is older than the sidecar -- an event that came while the file was
        # being labelled (`cp -r`: the new folder's scan found it closed first). `wardrobe
        # relabel` rewrites up-to-date sidecars on purpose.
        forced = written and (self.sidecars.changed_since(path, info) or
                              path in (self.relabelling or ()))
        if self.sidecars.is_up_to_date(path, info, rewrite=forced):  # a person's: never
            self.found.pop(path, None)
            return None
        why = self.sidecars.name_too_long(path) or self.sidecars.occupied(path)
        if why:
            if path not in self.cannot:
                log.warning("%r cannot have a sidecar: %s", path, why)
            self.cannot[path] = why
            self.found.pop(path, None)
            return None
        return info

    def _stat_inside(self, path):
        """lstat of `path` if it still exists inside the inbox, reached without symlinks."""
        parent, root = os.path.dirname(path), self.inbox.root
        if parent not in self._folders:
            self._folders[parent] = os.path.realpath(parent) == parent and (
                parent + os.sep).startswith(root + os.sep)
        if not self._folders[parent]:
            log.warning("not labelling %r: it is not inside %s", path, root)
            return None
        try:
            return os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None  # gone again: nothing to label
        except OSError as error:
            self._later(path, f"cannot stat: {error.strerror}")
            return False

    def _worker_died(self, chunk):
        """Every future in flight is broken (`chunk`'s too): decode them all again, as
        suspects (see _submit). A file that was alone in the pool when a worker died, twice,
        gets an error sidecar; any other work is simply redone."""
        chunks = [each for each in (chunk, *self.in_flight.values()) if each]
        alone = len(chunks) == 1 and len(chunks[0]) == 1 and not self.writing
        for writes in self.writing.values():
            self.pending.update((path, True) for path in writes)
        self.in_flight.clear()
        self.writing.clear()
        self._flying.clear()
        self.decoder.restart()
        for each in chunks:
            for path, info in each.items():
                deaths = self._suspects.get(path, 0) + alone
                if deaths >= 2:
                    del self._suspects[path]
                    self._write(path, info, {"error": "the image decoder crashed on this file"})
                else:
                    self._suspects[path] = deaths
                    self.pending[path] = True

    # ---- labelling ---------------------------------------------------------------------------

    def _finish(self, results):
        """Predict what decoded, and have every sidecar due written by the workers."""
        due, batch = [], []
        for path, info, kind, payload in results:
            self._suspects.pop(path, None)
            if not self._unchanged(path, info):
                continue  # changed or gone while we decoded: it comes round again
            if kind == "image":
                batch.append((path, info, payload))
            elif kind == "unreadable":
                self._later(path, payload)
            elif not self.inbox.settled(path, QUIET_SECONDS):
                continue  # a download that paused, say: an error only once it is finished
            else:
                due.append((path, info, {"error": payload}))
        if batch:
            labels = self.classifier.results([image for _, _, image in batch])
            due += [(path, info, result) for (path, info, _), result in zip(batch, labels)]
        now = fsutil.utc_timestamp()
        for start in range(0, len(due), WRITE_CHUNK):
            chunk = {path: (info, result) for path, info, result in due[start:start + WRITE_CHUNK]}
            sidecars = [(self.sidecars.path_for(path), self.sidecars.render(info, result, now),
                         self.sidecars.dated(info)) for path, (info, result) in chunk.items()]
            try:
                self.writing[self.decoder.submit_writes(sidecars)] = chunk
            except BrokenProcessPool:  # decoded again: cheap, and the decode settles it anew
                self.pending.update((path, True) for path in chunk)
                self._worker_died({})
                continue
            self._flying.update(chunk)

    def _landed(self, chunk):
        self._flying.difference_update(chunk)
        for path in chunk:
            if path in self._deferred:
                self.pending[path] = self._deferred.pop(path)

    def _written(self, future):
        """A chunk of sidecars came back from the workers: count them, retry what failed."""
        chunk = self.writing.pop(future)
        self._landed(chunk)
        try:
            outcomes = future.result()
        except BrokenProcessPool:
            self.pending.update((path, True) for path in chunk)  # the next step restarts them
            return 0
        written = 0
        for (path, (info, result)), (_, error) in zip(chunk.items(), outcomes):
            written += self._outcome(path, info, result, error)
        return written

    def _unchanged(self, path, info):
        """Is `path` still what was decoded? If it changed, it is looked at again."""
        try:
            now = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        same = (now.st_ino, now.st_size, now.st_mtime_ns) == (
            info.st_ino, info.st_size, info.st_mtime_ns)
        if not same:
            self.inbox.recheck_later(path, 0.0)
        return same

    def _write(self, path, info, result):
        """Write one sidecar here and now (the rare case: a file that crashed a worker)."""
        try:
            error = self.sidecars.write(path, info, result)
        except OSError as failure:
            error = (failure.errno, failure.strerror or str(failure))
        return self._outcome(path, info, result, error)

    def _outcome(self, path, info, result, error):
        if error == KEPT:  # a person labelled it meanwhile (the review page)
            self.found.pop(path, None)
            self.retry.pop(path, None)
            if self.relabelling:
                self.relabelling.discard(path)
            return 0
        if error is not None:
            number, why = error
            if number == errno.ENAMETOOLONG:
                self.found.pop(path, None)
                self.cannot[path] = f"sidecar name too long: {why}"
                log.warning("%r cannot have a sidecar: %s", path, why)
            else:
                self._later(path, f"cannot write its sidecar: {why}")
            return 0
        self.inbox.settling.forget(path)
        self.sidecars.written(path, info, result)
        outcome = "label" if "label" in result else "error"
        self.counts[outcome] += 1
        metrics.labelled(outcome, self.found.pop(path, None), self.clock())
        if self.relabelling and path in self.relabelling:
            self.relabelling.discard(path)
            self.relabelled += 1
        if self.retry.pop(path, None):
            log.info("labelled %r after retrying", path)
        self.cannot.pop(path, None)
        return 1

    def _later(self, path, why):
        """Retry `path` with backoff: 1 s, 2 s, 4 s ... at most RETRY_MAX apart."""
        _, delay = self.retry.get(path, (0.0, 0.0))
        if not delay:
            log.warning("%r: %s; will retry", path, why)
        delay = min(RETRY_MAX, max(RETRY_FIRST, delay * 2))
        self.retry[path] = (self.clock() + delay, delay)

    def _due_retries(self):
        now = self.clock()
        for path, (when, delay) in list(self.retry.items()):
            if when <= now:
                self.pending[path] = True
                self.retry[path] = (float("inf"), delay)  # until it fails again
