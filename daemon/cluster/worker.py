"""`wardrobe worker`: a machine that featurizes photos for a coordinator (a daemon with
`cluster.broker`). It takes jobs from the queue -- decode these photos, compute their
backbone features -- runs them on its own decode workers (daemon.inbox.decoding, the
daemon's), and answers with the features. It writes nothing of the coordinator's: the
coordinator stays the one writer of sidecars, data versions and checkpoints.

A job is refused, with a reason the coordinator acts on, when it is for another backbone
(the weights' checksum travels with it), or names photos this machine cannot see (a
missing `cluster.paths` mapping); each reason is said once here.

Shutdown order (SIGTERM): take no new job, finish the running ones (a second or so) and put
those taken but not started back on the queue (Dramatiq's Worker.stop), say this worker is
gone, stop the decode workers. A second SIGTERM forces the exit.
"""

import collections
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from daemon.cluster import broker as wire
from daemon.errors import EXIT_FATAL, EXIT_OK, ConfigError, WardrobeError
from daemon.service.addresses import show_broker

log = logging.getLogger("daemon.worker")  # the name users see: daemon.service.logs

RATE_SECONDS = 60  # photos/s is measured over this long
RECONNECT_SECONDS = 5


def cache_folder():
    """Where the converted backbone is kept: systemd's CacheDirectory=, else ~/.cache."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wardrobe"


class Worker:
    def __init__(self, config):
        self.config = config
        self.url = config.cluster.broker
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.decoder = self.runtime = self.weights = self.client = None
        self._lock = threading.Lock()
        self._said = set()  # reasons for refusing, said once each
        self._seen = set()  # the coordinators' folders seen on this machine
        self.jobs = self.photos = 0
        self._recent = collections.deque()  # (monotonic, photos) of the last RATE_SECONDS
        self._started = time.monotonic()
        self._signal = None  # the stop signal, once one came

    # ---- the service ---------------------------------------------------------------------------

    def run(self):
        log.info("wardrobe worker starting (pid %d): broker %s, cluster.paths %s", os.getpid(),
                 show_broker(self.url), dict(self.config.cluster.paths) or "none")
        wire.quiet_dramatiq()
        if not self.url:
            raise ConfigError("cluster.broker", "a worker needs the coordinator's broker, "
                              'such as cluster: {broker: "redis://HOST:6379/0"}')
        for prefix, mine in self.config.cluster.paths:
            if not os.path.isdir(mine):
                raise ConfigError("cluster.paths", f"{prefix} maps to {mine}, which is not a "
                                  "folder on this machine (is the share mounted?)")
        self._install_signal_handlers()
        from daemon.backbone import runtime

        self.weights = runtime.locate(self.config.weights)  # exit 2 before TensorFlow
        self.client = wire.client(self.url)
        if not self._connect():
            log.info("%s: stopping; bye", signal.Signals(self._signal).name)
            return EXIT_OK
        folder = cache_folder()
        try:
            self.runtime = runtime.prepare(folder, self.weights)  # once: imports TensorFlow
        except OSError as error:  # exit 1: systemd tries again (a full disk may go away)
            raise WardrobeError(f"cannot keep the converted backbone in {folder}: "
                                f"{error.strerror or error}") from None
        from daemon.inbox.decoding import Decoder

        # Every core: this machine is lent for the work (the daemon keeps at most 8)
        self.decoder = Decoder(workers=len(os.sched_getaffinity(0)))
        self.decoder.featurizer = self.runtime
        self.decoder.start()
        import dramatiq

        broker = wire.make_broker(self.url, self.client)
        dramatiq.actor(self.featurize, broker=broker, actor_name=wire.ACTOR,
                       queue_name=wire.QUEUE)
        # One thread a decode process, each with a job running and one at hand (a dead
        # worker holds few jobs); idle, it looks for jobs every 0.1 s at most
        worker = dramatiq.Worker(broker, worker_threads=self.decoder.workers,
                                 worker_timeout=100)
        worker.queue_prefetch = 2 * self.decoder.workers
        worker.start()
        log.info("worker %s ready: %d decode workers, broker %s, backbone %s (cache %s)",
                 self.name, self.decoder.workers, show_broker(self.url),
                 self.runtime.feature_id, folder)
        try:
            self._beat_until_stopped()  # a ConfigError (a changed password) ends it: exit 2
            log.info("%s: stopping", signal.Signals(self._signal).name)
        finally:
            worker.stop(timeout=30_000)
            self._gone()
            self.decoder.stop()
        log.info("bye")
        return EXIT_OK

    def _connect(self):
        """Wait for the broker (it may be starting too); False if stopped first."""
        said = False
        while not self.stopping.is_set():
            try:
                wire.check(self.client, self.url)  # a wrong password: exit 2
                if said:
                    log.info("the broker %s answers", show_broker(self.url))
                return True
            except wire.redis_errors() as error:
                if not said:
                    log.warning("cannot reach the broker (%s); trying every %d s", error,
                                RECONNECT_SECONDS)
                said = True
            self.stopping.wait(RECONNECT_SECONDS)
        return False

    def _beat_until_stopped(self):
        """Heartbeats: alive:<name> (expiring) and this worker's counts in the workers hash."""
        down = False
        while not self.stopping.is_set():
            try:
                with self._lock:
                    now = time.monotonic()
                    while self._recent and self._recent[0][0] < now - RATE_SECONDS:
                        self._recent.popleft()
                    span = min(RATE_SECONDS, now - self._started) or 1.0
                    state = {"name": self.name, "slots": self.decoder.workers,
                             "jobs": self.jobs, "photos": self.photos,
                             "photos_per_second": round(sum(n for _, n in self._recent)
                                                        / span, 2),
                             "backbone": self.runtime.feature_id, "seen": time.time()}
                pipe = self.client.pipeline()
                pipe.set(wire.alive_key(self.name), 1, ex=wire.ALIVE_SECONDS)
                pipe.hset(wire.WORKERS_KEY, self.name, json.dumps(state))
                pipe.execute()
                if down:
                    log.info("the broker is back")
                down = False
            except wire.redis_errors() as error:
                try:
                    wire.check(self.client, self.url)  # the password changed, say: exit 2
                except wire.redis_errors():
                    pass
                if not down:
                    log.warning("lost the broker (%s); Dramatiq reconnects by itself", error)
                down = True
            self.stopping.wait(wire.HEARTBEAT_SECONDS)

    def _gone(self):
        try:
            self.client.delete(wire.alive_key(self.name))
        except wire.redis_errors():
            pass  # it expires by itself

    def _install_signal_handlers(self):
        def on_signal(signum, frame):  # only flags: the main thread says it and stops
            if self.stopping.is_set():
                os._exit(EXIT_FATAL)  # a second one: force
            self._signal = signum
            self.stopping.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload

    # ---- one job (in Dramatiq's worker threads) ------------------------------------------------

    def featurize(self, job):
        """Run `job` ({"id", "key", "reply", "kind": "label"|"train", "root", "weights",
        "feature_id", "paths", "stats": [[size, mtime_ns] or None], "known": {index:
        [sha256]}}) and answer it."""
        started = time.perf_counter()
        try:
            # Still wanted? Not once answered, or sent again by a coordinator since restarted
            if not self.client.set(job["key"], self.name, xx=True, keepttl=True):
                return
            refused, failed, results = self._refusal(job), None, None
            refused = refused or self._other_file(job, [self._mapped(p) for p in job["paths"]])
            if not refused:
                try:
                    results = self._run(job)
                except BrokenProcessPool:  # a photo that crashes the decoder, say: the
                    self.decoder.restart()  # coordinator finds which, alone
                    failed = "a decode worker died on this machine"
                except WardrobeError as error:  # the backbone's file changed under us, say
                    log.error("%s", error)
                    refused = str(error)
            answer = wire.encode_answer(job["id"], self.name, results, refused, failed=failed,
                                        feature_id=self.runtime.feature_id,
                                        seconds=time.perf_counter() - started)
            pipe = self.client.pipeline()
            pipe.rpush(job["reply"], answer)
            pipe.expire(job["reply"], wire.ANSWERS_SECONDS)
            pipe.execute()
        except wire.redis_errors() as error:
            log.warning("job %s not answered, the broker is gone (%s): its coordinator sends "
                        "it again", job["id"][:8], error)
            return
        if results is not None:
            with self._lock:
                self.jobs += 1
                self.photos += len(results)
                self._recent.append((time.monotonic(), len(results)))

    def _refusal(self, job):
        if job.get("weights") != self.weights.sha256:
            return self._say(f"another backbone: the coordinator's weights are "
                             f"{str(job.get('weights'))[:16]}…, this worker's "
                             f"{self.weights.sha256[:16]}… (install the same, or set "
                             "`weights:` alike)")
        # The folder the photos are in (the inbox, the data folder); a photo gone since is
        # the decoders' to say. Not seen is asked again at the next job: a share mounts.
        root = self._mapped(job["root"])
        if root not in self._seen:
            if not os.path.isdir(root):
                return self._say(f"cannot see {root} on this machine (the coordinator's "
                                 f"{job['root']}): mount the share there or map it in "
                                 "cluster.paths")
            self._seen.add(root)
        return None

    def _say(self, why, example=None):
        """`why` we refuse a job, logged once (with an `example`)."""
        if why not in self._said:
            self._said.add(why)
            log.error("refusing jobs: %s%s", why, f"; for example {example}" if example else "")
        return why

    def _mapped(self, path):
        for prefix, mine in self.config.cluster.paths:
            if path == prefix or path.startswith(prefix + "/"):
                return mine + path[len(prefix):]
        return path

    def _other_file(self, job, paths):
        """Why this machine sees other files than the coordinator at `paths` (missing, or
        of another size or age), or None: a stale copy, or cluster.paths mapping to another
        folder. Their features would be other photos': refused, never answered."""
        for theirs, mine, stat in zip(job["paths"], paths, job.get("stats") or ()):
            if stat is None:
                continue  # gone from the coordinator too: the decoders say so
            try:
                info = os.stat(mine, follow_symlinks=False)
                seen = (info.st_size, info.st_mtime_ns)
            except OSError:
                seen = None
            if seen is None or not wire.same_file(seen, stat):
                return self._say(
                    f"sees other files than the coordinator under {self._mapped(job['root'])}"
                    " (a stale copy, or cluster.paths mapping to another folder)",
                    f"{mine}: {'missing' if seen is None else f'{seen[0]} bytes'}; the "
                    f"coordinator's {theirs}: {stat[0]} bytes")
        return None

    def _run(self, job):
        paths = [self._mapped(path) for path in job["paths"]]
        if job["kind"] == "label":
            future = self.decoder.submit(paths)
            return [(kind, payload, {"seconds": seconds})
                    for _, kind, payload, seconds in self.decoder.result(future)]
        known = {paths[int(index)]: tuple(shas) for index, shas in job["known"].items()}
        future = self.decoder.submit_training(paths, known)
        results = []
        for _, kind, payload in self.decoder.result(future):
            if kind == "image":
                features, digest, stat = payload
                results.append((kind, features, {"sha256": digest, "stat": list(stat)}))
            else:
                results.append((kind, payload, None))
        return results


def main(config):
    try:
        return Worker(config).run()
    except WardrobeError:
        raise
    except Exception:
        log.exception("fatal error")
        return EXIT_FATAL
