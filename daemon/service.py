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

from daemon import dataset
from daemon.inbox import Inbox
from daemon.sidecars import Sidecars
from daemon.errors import (EXIT_FATAL, EXIT_OK, AlreadyRunning, ConfigError,
                           IncompatibleCheckpoint, WardrobeError)
from daemon.store import CheckpointStore

log = logging.getLogger(__name__)


def setup_logging(level=logging.INFO):
    """One line per event on stderr; TensorFlow's own C++ chatter kept to errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
                dataset._find(config.data.path, name)
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
        announced_done = False
        while not self.stop_event.is_set():
            if self._signals:
                log.info("%s: stopping", signal.Signals(self._signals[0]).name)
                break
            if self._errors:
                break
            if not workers[0].is_alive() and not announced_done:
                log.info("training complete (%d epochs); labelling inbox images until stopped",
                         config.train.epochs)
                announced_done = True
            self._wait(1.0)
        # Shutdown order: stop taking inbox work, let the labeller finish its batch, stop
        # training at the next batch boundary (the trainer writes the checkpoint), exit.
        self.stop_event.set()
        inbox.stop()
        for worker in workers:
            worker.join()
        if self._errors:
            raise self._errors[0]
        log.info("bye")
        lock.close()
        return EXIT_OK

    def _start(self, name, target, *args):
        def work():
            try:
                target(*args)
            except BaseException as error:  # reported by the main loop
                log.error("%s failed: %s", name, error)
                self._errors.append(error)
            finally:
                self._wake_write.send(b"w")

        thread = threading.Thread(target=work, name=name)
        thread.start()
        return thread

    def _label(self, inbox, sidecars):
        from daemon.classifier import Classifier, Labeller

        labeller = Labeller(self.config, sidecars, Classifier(self.config))
        while not self.stop_event.is_set():
            paths = inbox.take(limit=512, timeout=0.5)
            if labeller.label(paths):
                log.debug("%d images labelled so far", labeller.labelled)

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
