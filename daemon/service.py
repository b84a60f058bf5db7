"""The daemon's lifecycle: the only place with threads and signal handlers.

Start order: logging, lock on save/, open the checkpoint store (repairing it, before
TensorFlow is imported), the inbox observer, then the trainer and labeller threads. Stop
order (SIGTERM or SIGINT): the handler only records the signal; the main loop sets the stop
event, stops the inbox observer, the labeller finishes its batch, the trainer ends fit at
the next batch boundary and writes the checkpoint; the main loop joins both and exits 0.
A second signal exits at once (the last checkpoint stays).
"""

import fcntl
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from daemon import dataset
from daemon.inbox import Inbox
from daemon.sidecars import Sidecars
from daemon.systemd import JournalFormatter, Notifier, stderr_is_journal
from daemon.errors import (EXIT_FATAL, EXIT_OK, AlreadyRunning, ConfigError,
                           IncompatibleCheckpoint, WardrobeError)
from daemon.store import CheckpointStore

log = logging.getLogger(__name__)


def setup_logging(level=logging.INFO):
    """One line per event on stderr; TensorFlow's own C++ chatter kept to errors. Under
    systemd's journal: no timestamps, levels as <N> priorities."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def open_store(config):
    """Pick the generation to resume from; quarantine what is damaged. No TensorFlow.

    A damaged newest generation falls back to the previous one (WARNING); if nothing is
    loadable, every checkpoint file moves to save/corrupt-<time>/ (ERROR) and training starts
    afresh; a checkpoint of another model is refused (exit 2) and left untouched.
    """
    store = CheckpointStore(config.save)
    newest, damaged = store.scan()
    if newest is not None:
        made_for = newest.get("fingerprint", {}).get("model")
        if made_for != config.model:
            raise IncompatibleCheckpoint(
                f"{config.save} holds a checkpoint of model {made_for!r} but the config asks "
                f"for {config.model!r}; set `model: {made_for}` or point `save` elsewhere")
    if damaged and newest is not None:
        target = store.quarantine([number for number, _ in damaged], with_exports=False)
        for number, why in damaged:
            log.warning("checkpoint %d is unusable (%s); moved to %s, resuming from "
                        "checkpoint %d", number, why, target, newest.number)
    elif newest is None and store.has_files():
        target = store.quarantine([number for number, _ in damaged], with_exports=True)
        log.error("no loadable checkpoint in %s (%s); moved the files to %s and starting "
                  "afresh", config.save, "; ".join(f"{n}: {why}" for n, why in damaged)
                  or "no manifest", target)
    store.tidy(newest)
    return newest


def check_data(config):
    """A missing data.path is a config error, reported before TensorFlow is imported."""
    if config.data.source == "path":
        try:
            for name in dataset.FILES.values():
                dataset.find_file(config.data.path, name)
        except WardrobeError as error:
            raise ConfigError("data.path", str(error)) from None


class Service:
    def __init__(self, config):
        self.config = config
        self.stop_event = threading.Event()  # asks the trainer to stop
        self._signals = []  # appended to by the handler, read by the main loop only
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        self._errors = []  # exceptions that ended a worker thread
        self.notifier = Notifier()
        self._labeller = None
        self._labeller_beat = time.monotonic()
        self._last_problem = None

    def run(self):
        config = self.config
        log.info("wardrobe starting (pid %d): %s", os.getpid(), config.summary())
        self._install_signal_handlers()
        check_data(config)
        lock = _lock(config.save)
        generation = open_store(config)
        if self._signals:
            log.info("stopped before training started; bye")
            return EXIT_OK

        from daemon.training import Trainer  # TensorFlow is imported from here on

        sidecars = Sidecars(config.classify.sidecar, config.classify.extensions)
        inbox = Inbox(config.inbox, sidecars)
        inbox.start()
        log.info("watching %s for %s images", config.inbox, ", ".join(config.classify.extensions))
        trainer = Trainer(config, generation, self.stop_event)
        workers = [self._start("trainer", trainer.run),
                   self._start("labeller", self._label, inbox, sidecars)]
        self._serve(trainer, workers, inbox)
        # Shutdown order: stop taking inbox work, let the labeller finish its batch, stop
        # training at the next batch boundary (the trainer writes the checkpoint), exit.
        self.stop_event.set()
        inbox.stop()
        for worker in workers:
            worker.join()
        self.notifier.close()
        if self._errors:
            raise self._errors[0]
        log.info("bye")
        lock.close()
        return EXIT_OK

    def _serve(self, trainer, workers, inbox):
        """The main loop: signals, READY/STATUS/WATCHDOG to systemd, worker failures."""
        watchdog = self.notifier.watchdog_seconds
        tick = min(1.0, watchdog / 4) if watchdog else 1.0
        ready = announced_done = False
        status = last_ping = None
        while not self._errors:
            if self._signals:
                log.info("%s: stopping", signal.Signals(self._signals[0]).name)
                self.notifier.notify("STOPPING=1")
                return
            now = time.monotonic()
            if not ready and trainer.restored.is_set():
                ready = True
                self.notifier.notify("READY=1")
                log.info("ready: model restored, inbox watched")
            if ready and not workers[0].is_alive() and not announced_done:
                log.info("training complete (%d epochs); labelling inbox images until stopped",
                         self.config.train.epochs)
                announced_done = True
            if ready and (current := self._status(trainer, workers[0])) != status:
                status = current
                self.notifier.notify(f"STATUS={status}")
            # Ping at least every WATCHDOG_USEC/2 (sd_notify(3)), whatever the tick's jitter.
            if ready and watchdog and (last_ping is None or now - last_ping >= watchdog / 2 - tick):
                problem = self._unhealthy(trainer, workers, inbox, now, limit=watchdog / 2)
                if problem is None:
                    self.notifier.notify("WATCHDOG=1")
                    last_ping = now
                elif problem != self._last_problem:
                    log.error("not pinging the systemd watchdog: %s", problem)
                self._last_problem = problem
            self._wait(tick)

    def _status(self, trainer, trainer_thread):
        labelled = f"{self._labeller.labelled:,} images labelled" if self._labeller else ""
        if trainer_thread.is_alive():
            return (f"training epoch {trainer.epoch + 1}/{self.config.train.epochs} "
                    f"(batch {trainer.step}), {labelled}")
        return f"serving, {labelled}"

    def _unhealthy(self, trainer, workers, inbox, now, limit):
        """Why the daemon is not healthy, or None: a training loop without progress, a
        labeller that stopped going round, an inbox observer that is not running."""
        trainer_thread, labeller_thread = workers
        if trainer_thread.is_alive() and now - trainer.last_progress > limit:
            return f"training made no progress for {now - trainer.last_progress:.0f} s"
        if not labeller_thread.is_alive() or now - self._labeller_beat > limit:
            return f"the labeller has not come round for {now - self._labeller_beat:.0f} s"
        if not inbox.healthy():
            return "the inbox observer is not running"
        return None

    def _start(self, name, target, *args):
        def work():
            try:
                target(*args)
            except BaseException as error:  # re-raised, and logged, by the main thread
                self._errors.append(error)
            finally:
                self._wake_write.send(b"w")

        thread = threading.Thread(target=work, name=name)
        thread.start()
        return thread

    def _label(self, inbox, sidecars):
        from daemon.classifier import Classifier, Labeller

        self._labeller = Labeller(self.config, sidecars, Classifier(self.config))
        while not self.stop_event.is_set():
            self._labeller_beat = time.monotonic()
            paths = inbox.take(limit=512, timeout=0.5)
            self._labeller.label(paths)

    def _install_signal_handlers(self):
        signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self._signals:
            os._exit(EXIT_FATAL)  # second signal: force; the last checkpoint stays
        self._signals.append(signum)

    def _wait(self, timeout):
        ready, _, _ = select.select([self._wake_read], [], [], timeout)
        if ready:
            self._wake_read.recv(4096)


def _lock(folder):
    """Hold an exclusive lock on save/.lock for the process's life; one daemon per save/."""
    folder.mkdir(parents=True, exist_ok=True)
    file = open(folder / ".lock", "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        raise AlreadyRunning(f"another wardrobe (pid {file.read().strip() or '?'}) is "
                             f"running on {folder}") from None
    file.truncate(0)
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def running_pid(folder):
    """The pid of the daemon holding save/.lock, or None."""
    try:
        with open(folder / ".lock") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return int(file.read().strip() or 0) or None
    except (OSError, ValueError):
        pass
    return None
