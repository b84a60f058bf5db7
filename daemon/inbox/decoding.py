"""Decoding on every core: worker processes turn image files into what the model takes --
28x28 arrays, or for a backbone model the photo's features (daemon.data.photos, then the
backbone's TensorFlow Lite runtime, loaded once per worker) -- and write the sidecars the
daemon has rendered.

Processes, not threads: preprocessing many small images is Python work that one GIL would
serialise, and a decoder that crashes or runs out of memory on a hostile file takes down a
worker, not the daemon. Work goes out in chunks sized from the measured time per image
(about CHUNK_SECONDS each), so a 12-megapixel photo is one task and a burst of thumbnails
is a few hundred per task; results come back as soon as each chunk is done. Sidecars are
written there too: thousands of small file creations are system calls that, in the daemon,
would queue behind its inotify thread for the interpreter lock. No TensorFlow is imported
here: the workers start from a clean interpreter (spawn).
"""

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from daemon.data import images, photos
from daemon.inbox.sidecars import publish_model
from daemon.service import logs

log = logging.getLogger("daemon.decoding")  # the name users see: daemon.service.logs

# After a kill -9, multiprocessing's resource tracker (a process of its own, started with
# the pool, that outlives the daemon) unlinks the pool's semaphores and warns about them on
# stderr, in no format of ours. It runs with this interpreter's -W options: it does the
# cleaning, quietly.
if "ignore:resource_tracker" not in sys.warnoptions:
    sys.warnoptions.append("ignore:resource_tracker")

ORPHAN_SECONDS = 0.5  # a worker whose daemon died ends within this
CHUNK_SECONDS = 0.1
MAX_CHUNK = 256


_featurizers = {}  # in a worker: .tflite path -> daemon.backbone.runtime.Featurizer


def decode_chunk(paths, featurizer=None):
    """In a worker: [(path, kind, payload, seconds)] with kind "image" (a 28x28 array, or
    with `featurizer`, (a backbone's .tflite, its sha256), the photo's features), "bad"
    (final: the content cannot be labelled) or "unreadable" (may go away)."""
    results = []
    for path in paths:
        started = time.perf_counter()
        if featurizer is None:
            kind, payload = _attempt(images.load, path)
        else:
            kind, payload = _attempt(photos.load, path)
            if kind == "image":
                payload = _featurizer(featurizer)(payload)
        results.append((path, kind, payload, time.perf_counter() - started))
    return results


def decode_training_chunk(paths, featurizer=None, known=None):
    """In a worker, for a data version: [(path, kind, payload)]; an image's payload is
    (28x28 or features, sha256, (size, mtime_ns, ino)) of the file as read. `known`:
    {path: sha256s whose features are kept already}: a file with one of those contents (a
    copy) comes back with None for its features, not featurized again."""
    known = known or {}
    return [(path, *_attempt(_for_training, path, featurizer, known.get(path, ())))
            for path in paths]


def _for_training(path, featurizer, known):
    if featurizer is None:
        image, digest, info = images.load_for_training(path)
    else:
        image, digest, info = photos.load_for_training(path, known=known)
        if image is not None:
            image = _featurizer(featurizer)(image)
    return image, digest, (info.st_size, info.st_mtime_ns, info.st_ino)


def _featurizer(spec):
    """`spec`: (a .tflite path, its sha256), checked as it is loaded, once per worker."""
    if spec not in _featurizers:
        from daemon.backbone import runtime  # the workers of a backbone model only

        _featurizers[spec] = runtime.checked(*spec)
    return _featurizers[spec]


def _attempt(load, *args):
    """("image", load(*args)), or ("bad", why) for a verdict on the content, or
    ("unreadable", why) for what may go away."""
    try:
        return "image", load(*args)
    except images.BadImage as error:
        return "bad", str(error)
    except images.Unreadable as error:
        return "unreadable", str(error)
    except MemoryError:
        return "unreadable", "out of memory while decoding"


def _start_worker(parent, level):
    """In a worker: log as the daemon does; end with the daemon, even a daemon killed with
    SIGKILL (a worker blocked on the task queue would otherwise wait for ever: it holds that
    queue's write end too). Watched by a thread of its own, not PR_SET_PDEATHSIG, which
    fires when the *thread* that started the process ends: in `wardrobe worker` the pool
    is started by one of Dramatiq's threads, which end one by one as it stops."""
    logs.setup(level)
    threading.Thread(target=_end_with, args=(parent,), name="end with parent",
                     daemon=True).start()


def _end_with(parent):
    while os.getppid() == parent:
        time.sleep(ORPHAN_SECONDS)
    os._exit(1)


@contextlib.contextmanager
def _spawning():
    """Around what may start processes (the pool's workers, multiprocessing's resource
    tracker): fd 2 is the real stderr, and SIGHUP blocked, which they inherit. A SIGHUP to
    the daemon's whole process group (a terminal closed, `timeout`) reloads the daemon's
    config; it must not kill its workers and tracker (tracebacks in the log)."""
    with logs.uncaptured():
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _abandon(pool):
    """Free a pool whose reader waits for ever (see Decoder.lost): end its workers (they may
    hold its queues' locks) and close our copy of their results pipe's write end, so that
    the reader sees the end of the file, the pool breaks and its thread ends."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    queue = getattr(pool, "_result_queue", None)
    if queue is not None:
        queue._writer.close()


def write_chunk(sidecars):
    """In a worker: publish [(path, bytes, mtime_ns or None)] unless a person's label is
    there; [(path, None or KEPT or (errno, why))]."""
    results = []
    for path, data, mtime_ns in sidecars:
        try:
            results.append((path, publish_model(path, data, mtime_ns)))
        except OSError as error:
            results.append((path, (error.errno, error.strerror or str(error))))
    return results


class Decoder:
    """A pool of decode workers. submit() returns a future of decode_chunk's list; after a
    worker crash the pool is replaced (the caller retries what was in flight)."""

    def __init__(self, workers=None):
        self.workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
        # A backbone model's daemon.backbone.runtime.Runtime: images become features in the
        # workers. None: 28x28 arrays.
        self.featurizer = None
        self._seconds_per_image = CHUNK_SECONDS  # one image a chunk until measured
        self._pool = None

    def start(self):
        # spawn: a clean interpreter without TensorFlow's threads, and no socket path that a
        # deep save/ folder could make too long (forkserver's)
        context = multiprocessing.get_context("spawn")
        with _spawning():
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker,
                initargs=(os.getpid(), logging.getLogger().getEffectiveLevel()))

    def stop(self, wait=True):
        """Cancel what has not started; with `wait`, let the workers finish their chunk and
        leave (they are quick; it keeps multiprocessing's resource tracker quiet). A broken
        pool is never waited for: its manager is gone, a join would hang."""
        pool = self._pool
        if pool is not None:
            lost = self.lost()
            if lost:
                _abandon(pool)
            broken = lost or bool(getattr(pool, "_broken", False))
            pool.shutdown(wait=wait and not broken, cancel_futures=True)

    def restart(self):
        log.warning("a decode worker died (a file that crashes the decoder, or memory); "
                    "starting new workers")
        self.stop(wait=False)
        self.start()

    def lost(self):
        """Has a worker died without the pool noticing? One killed while it was sending its
        results (the OOM killer, at any moment) leaves the pool's reader waiting for the rest
        of the message for ever, in CPython's ProcessPoolExecutor: the pool never breaks and
        its futures never end. Callers waiting on futures ask this every second or so."""
        pool = self._pool
        if pool is None or getattr(pool, "_broken", False):
            return False
        processes = list((getattr(pool, "_processes", None) or {}).values())
        return any(process.exitcode is not None for process in processes)

    def chunk_size(self):
        return max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / self._seconds_per_image)))

    def submit(self, paths):
        return self._submit(decode_chunk, paths, self._featurizer_spec())

    def submit_training(self, paths, known=None):
        """A future of decode_training_chunk's list (see decode_all)."""
        return self._submit(decode_training_chunk, paths, self._featurizer_spec(), known or {})

    def _featurizer_spec(self):
        """What the workers load the featurizer from: (.tflite path, its sha256)."""
        if self.featurizer is None:
            return None
        return (os.fspath(self.featurizer.path), self.featurizer.sha256)

    def _submit(self, function, *arguments):
        try:
            # submit() starts the workers: not while the TensorFlow import's output is
            # captured (a few seconds at start), or they would inherit the capture as stderr
            with _spawning():
                return self._pool.submit(function, *arguments)
        except OSError as error:
            # A worker died while the pool was starting its replacement ("handle is
            # closed"): the pool is broken, it just does not know it yet.
            raise BrokenProcessPool(f"a decode worker died: {error}") from error

    def decode_all(self, paths, chunk=None, known=None):
        """decode_training_chunk over many paths on every worker; results in order. A file
        that kills a worker (a decoder crash, memory) is found by decoding what was in
        flight again one task at a time, then alone: it comes back "bad". `known`: see
        decode_training_chunk."""
        chunk = chunk or (256 if self.featurizer is None else 16)  # a photo's features: ~20 ms
        parts = [paths[i: i + chunk] for i in range(0, len(paths), chunk)]
        futures, results, again = [], {}, []
        known = known or {}

        def submit(part):
            return self.submit_training(part, {path: known[path] for path in part
                                               if path in known})

        for part in parts:
            try:
                futures.append((part, submit(part)))
            except BrokenProcessPool:  # broke while we were handing out work
                again.append(part)
        for part, future in futures:
            try:
                results.update((result[0], result) for result in self.result(future))
            except BrokenProcessPool:
                again.append(part)
        if again:
            self.restart()
        while again:
            part = again.pop(0)
            try:
                done = self.result(submit(part))
                results.update((result[0], result) for result in done)
            except BrokenProcessPool:
                self.restart()
                if len(part) == 1:
                    results[part[0]] = (part[0], "bad", "the image decoder crashed on this file")
                else:
                    again[:0] = [[path] for path in part]
        return [results[path] for path in paths]

    def result(self, future):
        """future.result(), or BrokenProcessPool if the pool lost a worker unnoticed."""
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self.lost():
                    raise BrokenProcessPool("a decode worker died unnoticed") from None

    def submit_writes(self, sidecars):
        return self._submit(write_chunk, sidecars)

    def measured(self, results):
        """Update the time-per-image estimate from a finished chunk."""
        if results:
            mean = sum(r[3] for r in results) / len(results)
            self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * max(mean, 1e-5)
