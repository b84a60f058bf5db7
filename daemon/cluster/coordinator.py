"""The coordinator's side of the cluster: the daemon's decode work goes to the workers when
any are alive, and is done here otherwise. The labeller and the data source do not know:
they get a Dispatch (daemon.cluster.dispatch), which has the Decoder's interface and futures
of the same results.

The coordinator never trusts the queue for correctness. It keeps every job it sent (the
paths, the future its caller waits on) and takes each answer at most once: an answer for a
job already answered, done here, or sent by a run of the daemon since killed is ignored.
What is not answered in time is sent again, or done here: a job whose worker stopped
beating, or that Redis lost (restarted without persistence), at once; any other after
RESEND_SECONDS. With the broker unreachable or no worker alive, everything is done here
(a WARNING once, an INFO when it is back): labelling never stops because a machine did.

Only backbone models go out: a photo's features are the costly part (tens of ms); a 28x28
crop costs less to decode than to queue.
"""

import concurrent.futures
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures.process import BrokenProcessPool

from daemon.cluster import broker as wire
from daemon.cluster.dispatch import Dispatch, chain, decoded
from daemon.cluster.roster import Roster
from daemon.errors import ConfigError
from daemon.service import metrics
from daemon.service.addresses import show_broker

log = logging.getLogger("daemon.cluster")  # the name users see: daemon.service.logs

JOB_SECONDS = 0.5  # of a worker's time: the queue's cost per job (ms) stays under 1 %
MAX_JOB = 256
RESEND_SECONDS = 20.0  # a job not answered in this long is sent again (twice), then done here
ATTEMPTS = 2
REFRESH_SECONDS = 2.0  # between two looks at the workers and the queue
RECONNECT_SECONDS = 5.0
CONFIG_RETRY_SECONDS = 10.0  # a wrong password, say: it may be put right on the server


def coordinator_id(save):
    """This daemon among the broker's coordinators, the same across its restarts."""
    return hashlib.sha256(f"{socket.gethostname()}\0{save}".encode()).hexdigest()[:12]


class Job:
    def __init__(self, dispatch, kind, paths, known):
        self.id = uuid.uuid4().hex
        self.dispatch, self.kind, self.paths, self.known = dispatch, kind, paths, known
        self.future = concurrent.futures.Future()
        self.sent = 0.0
        # (size, mtime_ns) of each photo as seen here: a worker that sees another file at
        # that path (a stale mirror, a wrong cluster.paths) refuses the job
        self.stats = [_stat(path) for path in paths]
        self.attempts = 0
        self.taker = None  # the worker that took it, as it says in the job's key


def _stat(path):
    try:
        info = os.stat(path, follow_symlinks=False)
        return [info.st_size, info.st_mtime_ns]
    except OSError:
        return None  # the worker's decoders say what became of it


class Cluster:
    """`settings`: config.cluster; `save`: the daemon's save/ (who it is); `weights`: the
    backbone's daemon.backbone.runtime.Weights (its sha256 travels with each job)."""

    def __init__(self, settings, save, weights):
        self.url = settings.broker
        self.weights = weights.sha256
        self.shown = show_broker(self.url)
        self.coordinator = coordinator_id(save)
        self.run_id = uuid.uuid4().hex[:12]
        self.reply = wire.answers_key(self.coordinator, self.run_id)
        self.client = self.broker = None
        self._lock = threading.Lock()
        self._jobs = {}  # job id -> Job, sent and not answered
        self.roster = Roster()
        self._up = None  # the broker answers (None: not asked yet)
        self._down_level = None  # how the last "cannot use the broker" was said
        self._usable = False  # ... and a worker alive that takes our jobs
        self._forget = []  # job keys to delete once the broker is back
        self._said = set()
        self._seconds_per_image = 0.05  # a photo on a worker's core, until measured
        self.queue = 0
        wire.quiet_dramatiq()

    def dispatch(self, local, root):
        """A Dispatch over the local Decoder `local`, for files under the folder `root`
        (the inbox, the data folder): a worker that cannot see it refuses our jobs."""
        return Dispatch(self, local, root)

    # ---- asked by the labeller's and the data source's threads ---------------------------------

    @property
    def usable(self):
        return self._usable

    def slots(self):
        return self.roster.slots()

    def chunk_size(self):
        return max(1, min(MAX_JOB, int(JOB_SECONDS / self._seconds_per_image)))

    def send(self, dispatch, kind, paths, known=None):
        """A future of `paths` decoded by a worker (as Decoder.submit's, or for kind "train"
        submit_training's), or None if there is no worker to send them to."""
        if not self._usable:
            return None
        job = Job(dispatch, kind, paths, known or {})
        try:
            self._enqueue(job)
        except wire.redis_errors() as error:
            with self._lock:
                self._jobs.pop(job.id, None)
            self._down(error)
            return None
        return job.future

    def _enqueue(self, job):
        """Send `job` (again): its key says it is wanted; it is known before it is sent (the
        answer may be quick)."""
        key = wire.job_key(self.coordinator, self.run_id, job.id)
        body = {"id": job.id, "key": key, "reply": self.reply, "kind": job.kind,
                "root": job.dispatch.root,
                "weights": self.weights, "feature_id": job.dispatch.feature_id,
                "paths": job.paths, "stats": job.stats,
                "known": {str(i): list(job.known[p]) for i, p in enumerate(job.paths)
                          if p in job.known}}
        self.client.set(key, "", ex=wire.JOB_SECONDS)
        job.sent = time.monotonic()
        job.attempts += 1
        job.taker = None
        with self._lock:
            self._jobs[job.id] = job
        self.broker.enqueue(wire.message(body))

    # ---- the cluster thread (the service's) ----------------------------------------------------

    def run(self, stop):
        """Take answers, watch the workers and the queue, send again what is late; until
        `stop` is set. Then whatever is still out is done here."""
        next_look = 0.0
        while not stop.is_set():
            if not self._up and not self._connect(stop):
                continue
            try:
                item = self.client.blpop([self.reply], timeout=1)
                if item is not None:
                    self._answer(item[1])
                now = time.monotonic()
                if now >= next_look:
                    self._look()
                    next_look = now + REFRESH_SECONDS
                self._late(now)
            except wire.redis_errors() as error:
                self._down(error)
        self._usable = False
        self._all_here("stopping")

    def _connect(self, stop):
        """Connect (again); True once the broker answers."""
        try:
            if self.client is None:
                self.client = wire.client(self.url)
                self.broker = wire.make_broker(self.url, self.client)
            wire.check(self.client, self.url)
            self._clean()
        except ConfigError as error:
            self._say_down(str(error), logging.ERROR)
            stop.wait(CONFIG_RETRY_SECONDS)
            return False
        except wire.redis_errors() as error:
            self._say_down(f"{error}", logging.WARNING)
            stop.wait(RECONNECT_SECONDS)
            return False
        if self._up is False:
            log.info("the broker %s is back", self.shown)
        self._up, self._down_level = True, None
        return True

    def _say_down(self, why, level):
        """Say once why the broker cannot be used (again when the reason's kind changes:
        unreachable, then a password refused)."""
        if self._up is not False or level != self._down_level:
            log.log(level, "cluster: %s; featurizing here until it answers", why)
        self._up, self._down_level = False, level

    def _clean(self):
        """Keys of this coordinator's previous runs (a kill -9): their jobs are no longer
        wanted, their answers no longer read. And those of jobs done here while the broker
        was away."""
        stale = [key for pattern in (wire.job_key(self.coordinator, "*", "*"),
                                     wire.answers_key(self.coordinator, "*"))
                 for key in self.client.scan_iter(match=pattern, count=1000)
                 if f":{self.run_id}:" not in key.decode() and
                 not key.decode().endswith(self.run_id)]
        forget, self._forget = self._forget, []
        for start in range(0, len(stale + forget), 1000):
            self.client.delete(*(stale + forget)[start:start + 1000])

    def _down(self, error):
        """The broker is gone: what is out is done here."""
        self._usable = False
        self._say_down(f"the broker {self.shown} is unreachable ({error})", logging.WARNING)
        self._all_here("the broker is unreachable")

    def _look(self):
        """The workers' heartbeats, the queue's length, who took which job."""
        states = self.client.hgetall(wire.WORKERS_KEY)
        names = [name.decode() for name in states]
        with self._lock:
            jobs = list(self._jobs.values())
        pipe = self.client.pipeline()
        for name in names:
            pipe.pttl(wire.alive_key(name))
        pipe.llen(wire.QUEUE_KEY)
        for job in jobs:
            pipe.get(wire.job_key(self.coordinator, self.run_id, job.id))
        replies = pipe.execute()
        ttls, self.queue, takers = replies[:len(names)], replies[len(names)], replies[len(names) + 1:]
        self.roster.look(states, ttls, self.client)
        self._update_usable()
        metrics.cluster(self.queue, self.roster.taking())
        for job, taker in zip(jobs, takers):
            if taker is None:  # its key is gone: Redis lost it (restarted)
                self._again(job, "lost by the broker")
            elif taker:
                job.taker = taker.decode()
                if not self.roster.alive(job.taker):
                    self._again(job, f"its worker {job.taker} is gone")

    def _update_usable(self):
        """Are there workers to send jobs to? Said when it changes; the jobs out are done
        here once there are none."""
        was, self._usable = self._usable, bool(self._up) and self.roster.taking() > 0
        if was and not self._usable:
            log.warning("cluster: no worker takes our jobs now; featurizing here")
            self._all_here("no worker takes them")
        elif self._usable and not was:
            taking = self.roster.taking()
            log.info("cluster: %d worker%s alive; featurizing on them", taking,
                     "" if taking == 1 else "s")

    def _late(self, now):
        with self._lock:
            late = [job for job in self._jobs.values() if now - job.sent > RESEND_SECONDS]
        for job in late:
            self._again(job, f"not answered in {RESEND_SECONDS:.0f} s")

    def _again(self, job, why):
        """Send `job` again (a new message, the same job: the first answer wins), or after
        ATTEMPTS do it here."""
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return  # answered meanwhile
        metrics.cluster_job(job.taker or "none", "resent")
        log.info("cluster: job %s (%d photos) %s; %s", job.id[:8], len(job.paths), why,
                 "sending it again" if job.attempts < ATTEMPTS and self._usable
                 else "doing it here")
        if job.attempts < ATTEMPTS and self._usable:
            self._enqueue(job)
        else:
            self._here(job)

    def _all_here(self, why):
        with self._lock:
            jobs = list(self._jobs.values())
        if jobs:
            log.info("cluster: %d jobs out (%s): doing them here", len(jobs), why)
        for job in jobs:
            self._here(job)

    def _unwant(self, job):
        """No worker is to run `job` now: its key goes, at once while the broker answers,
        else once it is back (kept till then: a list that only grows while it is away)."""
        key = wire.job_key(self.coordinator, self.run_id, job.id)
        if self._up:
            try:
                self.client.delete(key)
                return
            except wire.redis_errors():
                pass
        self._forget.append(key)

    def _here(self, job):
        """Do `job` with the local decode workers; its caller's future gets their result."""
        with self._lock:
            if self._jobs.pop(job.id, None) is None:
                return
        self._unwant(job)
        metrics.cluster_job(job.taker or "none", "local")
        local = job.dispatch.local
        try:
            if job.kind == "label":
                future = local.submit(job.paths)
            else:
                future = local.submit_training(job.paths, job.known)
        except (BrokenProcessPool, RuntimeError) as error:  # RuntimeError: shut down
            job.future.set_exception(BrokenProcessPool(f"the decode workers: {error}"))
            return
        future.add_done_callback(lambda done: chain(done, job.future))

    # ---- answers -------------------------------------------------------------------------------

    def _answer(self, data):
        try:
            meta, features = wire.decode_answer(data)
        except ValueError as error:
            log.warning("cluster: an answer that cannot be read (%s); ignored", error)
            return
        worker = str(meta.get("worker"))
        with self._lock:
            job = self._jobs.pop(str(meta.get("job")), None)
        if job is None:
            metrics.cluster_job(worker, "late")
            return
        self._unwant(job)
        refused, failed = meta.get("refused"), meta.get("failed")
        if refused or failed:
            if refused and self.roster.refuses(worker, refused):
                log.warning("cluster: worker %s refuses our jobs: %s", worker, refused)
            elif failed:
                log.info("cluster: worker %s failed a job (%s); doing it here", worker, failed)
            metrics.cluster_job(worker, "refused" if refused else "failed")
            with self._lock:
                self._jobs[job.id] = job
            self._here(job)
            self._update_usable()
            return
        try:
            results = decoded(job.kind, job.paths, meta, features)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            log.warning("cluster: worker %s sent a wrong answer (%s); doing its job here",
                        worker, error)
            with self._lock:
                self._jobs[job.id] = job
            self._here(job)
            return
        if meta.get("feature_id") and meta["feature_id"] != job.dispatch.feature_id and \
                worker not in self._said:
            self._said.add(worker)
            log.warning("cluster: worker %s computes features that differ in the last bits "
                        "from this machine's (another CPU kind or TensorFlow)", worker)
        busy = meta.get("seconds")
        if isinstance(busy, (int, float)) and job.paths:
            each = max(float(busy) / len(job.paths), 1e-4)
            self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * each
        metrics.cluster_job(worker, "done", time.monotonic() - job.sent)
        job.future.set_result(results)

    # ---- status --------------------------------------------------------------------------------

    def snapshot(self):
        """status --json's `cluster`."""
        return {"broker": self.shown, "connected": bool(self._up), "queue": self.queue,
                "jobs_out": len(self._jobs), "workers": self.roster.snapshot()}
