"""The trainer: the data version in use, exact resume point, cooperative stop.

fit() runs one epoch at a time on the batches of daemon.training.epochs (each epoch's order
from seed and epoch alone); the Checkpoint callback restores state and skips the batches
already trained on. A backbone model trains its head on the features of its data versions
and is exported whole.
"""

import logging
import threading
import time

import keras
import tensorflow as tf

from daemon.data.versions import Data, VersionStore
from daemon.service import metrics
from daemon.service.config import NUM_CLASSES
from daemon.training import models
from daemon.training.checkpoints import Checkpoint
from daemon.training.curves import Curves
from daemon.training.epochs import (EpochBatches, EpochLog, Progress, StopOnEvent, evaluate,
                                    report_epoch)
from daemon.training.store import data_kind

log = logging.getLogger("daemon.training")  # the name users see: daemon.service.logs

BOUNDARY_WAIT_SECONDS = 10.0  # at most, for a data version being made
SAVE_AGAIN_SECONDS = 30.0  # an epoch's checkpoint that could not be written: tried again


class Trainer:
    """Trains `config.model` on the newest data version up to the target epoch, then waits
    for a new target (a reload), a new data version, or a stop. run() blocks; setting
    stop_event (and wake), from any thread, ends it at the next batch boundary with a
    checkpoint.

    A new data version is taken at an epoch boundary only: the model widens by the new
    classes and the target becomes at least the current epoch + train.epochs_per_update.
    A checkpoint inside an epoch resumes on the version that epoch started with.

    `phase` tells the service what a stop would lose: only in "training" with batches
    trained since the last checkpoint (unsaved()) must it wait; "loading", "waiting" (for
    data), "evaluating" and "idle" have everything on disk already."""

    def __init__(self, config, generation, stop_event, backbone=None):
        self.config = config
        # a backbone model's (daemon.backbone.runtime.Weights, .Runtime): the head trains
        # on the features of data versions made with this runtime, and is exported whole
        self.backbone = backbone
        self.feature_id = backbone[1].feature_id if backbone else None
        self._whole = (None, None)  # (head, whole model around it)
        self.generation = generation  # verified checkpoint to resume from, or None
        self.stop_event = stop_event
        self.configured = config.train.epochs  # train.epochs, live
        self.data_target = 0  # raised by each new data version
        self.epochs = self.configured  # the target: the larger of the two
        self.wake = threading.Event()  # a new target, new data, or stop
        self._phase = "loading"
        self.epoch = self.step = 0
        self.checkpoint = None
        self.data = None  # the data version in use (daemon.data.versions.Data)
        self.validation_accuracy = None  # the last epoch's
        self.trained_once = False  # for one log line: the first batch of this run
        self.data_pending = lambda: False  # is a data version being made? (the service's)
        self.data_damaged = lambda number: None  # tell the data source a version is unusable
        self.labelled = lambda: 0  # images labelled so far by this process (the service's)
        self._labelled_before = 0  # ... when the last epoch ended
        self.curves = None  # TensorBoard (daemon.training.curves)
        self.unusable = set()  # data versions that could not be read
        self.taking = None  # the data version being taken into use
        self.missing = 0  # the checkpoint's data version, missing at start: wait for above it
        self.restored = threading.Event()  # the model is ready: set after restore
        self.last_progress = time.monotonic()  # for the watchdog: a batch, an epoch...

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, value):
        self._phase = value
        metrics.training(value == "training")

    def unsaved(self):
        """Is there progress a stop would lose: batches trained since the last checkpoint
        (in an epoch, or an epoch's end whose checkpoint could not be written)?"""
        return self.phase in ("training", "idle") and self.checkpoint is not None and bool(
            self.checkpoint.unsaved)

    def set_target(self, epochs):
        """train.epochs changed (a reload, from the service's thread)."""
        self.configured = epochs
        self._retarget()

    def _retarget(self):
        self.epochs = max(self.configured, self.data_target)
        self.wake.set()

    def run(self):
        train = self.config.train
        keras.config.disable_interactive_logging()  # Keras's messages go to logging, not print
        keras.utils.set_random_seed(train.seed)
        tf.config.experimental.enable_op_determinism()
        self.versions = VersionStore(self.config.save)
        generation = self.generation
        resumed = self._resumed_version(generation)
        data = self._load(resumed) if resumed is not None else None
        inside_epoch = data is not None  # a position inside an epoch holds on its own data only
        while data is None:
            self.phase = "waiting"
            version = self._wait_for_data()
            if version is None:
                return None
            data = self._load(version)
        self.phase = "loading"
        self.data = data
        log.info("%s", self.data)
        width = (len(generation.get("classes", [])) or NUM_CLASSES) if generation else \
            len(self.data.classes)
        model = models.build(self.config.model, seed=train.seed, num_classes=width)
        checkpoint = Checkpoint(self.config.save, every_batches=train.checkpoint_batches,
                                fingerprint=self.fingerprint())
        checkpoint.set_model(model)
        checkpoint.validate = self._validate
        checkpoint.measure = self._measure
        checkpoint.after_epoch = self._draw
        if self.backbone is not None:
            checkpoint.exported = self._whole_model
        self.epoch, self.step = checkpoint.restore(generation, inside_epoch=inside_epoch)
        if generation is not None and generation["step"] and not inside_epoch:
            log.warning("checkpoint %d stopped inside epoch %d, on data not at hand (a data "
                        "version missing, or made before data versions): that epoch starts "
                        "again at its first batch", generation.number, generation["epoch"] + 1)
        if generation is not None:
            self.data_target = generation.get("data_target", 0)
            self.validation_accuracy = generation.get("validation_accuracy")
        if self.missing:  # made again from the source, which may hold more by now
            self.data_target = max(self.data_target,
                                   self.epoch + self.config.train.epochs_per_update)
        self._retarget()
        self.checkpoint, self.model = checkpoint, model
        if len(self.data.classes) > width:
            self._widen()
        self._describe_data()
        self.last_progress = time.monotonic()
        self.restored.set()
        # After READY: a save/ from before the curves draws every epoch of its history once.
        self.curves = Curves(self.config.save)
        self.curves.draw(checkpoint.history, generation and generation.get("confusion"))
        if checkpoint.history:
            report_epoch(checkpoint.history[-1])  # the metrics, from the checkpoint
        where = "resuming from" if checkpoint.restored else "no checkpoint in"
        log.info("%s %s: epoch %d/%d, batch %d", where, self.config.save, self.epoch,
                 self.epochs, self.step)
        trained = announced = False
        while not self.stop_event.is_set():
            if self.step == 0:
                self._take_newest_data()
            if self.epoch < self.epochs:
                self.phase = "training"
                epoch = self.epoch
                callbacks = [StopOnEvent(self.stop_event), Progress(self), self.checkpoint,
                             EpochLog(self.checkpoint, self)]
                self.model.fit(self.batches.of_epoch(epoch), initial_epoch=epoch,
                               epochs=epoch + 1, shuffle=False, verbose=0, callbacks=callbacks)
                trained = True
                if self.step:  # stopped inside this epoch
                    log.info("stopped at batch %d of epoch %d; checkpoint %.0f ms", self.step,
                             epoch + 1, self.checkpoint.last_write_ms or 0)
                    return self.model
                continue
            self.phase = "evaluating"
            if trained:
                self._report_test_accuracy()
            if self.stop_event.is_set():
                break
            if trained or not announced:
                log.info("training complete (%d epochs); labelling inbox images until "
                         "stopped", self.epoch)
            trained, announced = False, True
            self.phase = "idle"
            self.wake.clear()  # then look again: a target or data set just before is not lost
            if self.checkpoint.unsaved:
                self._save_again()
            if self.epoch >= self.epochs and not self.stop_event.is_set() and \
                    not self._newer_version():
                self.wake.wait(SAVE_AGAIN_SECONDS if self.checkpoint.unsaved else None)
            self.last_progress = time.monotonic()
        if self.checkpoint.unsaved and not self.step:
            self._save_again()  # stopping: a last try
        return self.model

    def _save_again(self):
        """The last epoch's checkpoint could not be written (a full disk, a permission):
        write it now, with that epoch's validation (it competes for the best). Tried again
        while idle, and at the stop, until it is written: nothing trained is lost, and the
        inbox gets its model once the disk has room."""
        last = self.checkpoint.history[-1] if self.checkpoint.history else {}
        scores = {key: last[key] for key in ("val_loss", "val_accuracy")
                  if last.get(key) is not None}
        if self.checkpoint.save(self.epoch, 0, scores=scores) is not None:
            log.info("the checkpoint of epoch %d is written at last", self.epoch)
            self._draw(self.checkpoint.history)

    def fingerprint(self):
        """What a checkpoint must share with this run for the resume to be exact (the data
        is named by version, with each checkpoint)."""
        train = self.config.train
        fingerprint = {"model": self.config.model, "batch_size": train.batch_size,
                       "seed": train.seed}
        if self.backbone is not None:
            fingerprint["weights"] = self.backbone[0].sha256
        return fingerprint

    def _whole_model(self, head):
        """The backbone with `head` on top, for model.json + model.h5 (built once per head:
        a widened head is a new model)."""
        if self._whole[0] is not head:
            from daemon.backbone import efficientnet

            backbone = efficientnet.build()
            efficientnet.assign(backbone, self.backbone[0].state())
            self._whole = (head, models.whole(backbone, head))
        return self._whole[1]

    def _usable(self, version):
        """Does `version` hold what this model trains on: features of this backbone's
        runtime, or pixels for a model without one?"""
        return version.get("features") == self.feature_id

    # ---- data versions -------------------------------------------------------------------------

    def _resumed_version(self, generation):
        """The version a checkpoint trained on (an interrupted epoch resumes on it), if any."""
        if generation is None or generation.get("data_version") is None:
            return None
        version = self.versions.get(generation["data_version"])
        if version is not None and not self._usable(version):
            log.warning("data version %d, named by checkpoint %d, holds other features than "
                        "this backbone computes now; a new version is being made",
                        version.number, generation.number)
            return None
        if version is None:
            self.missing = generation["data_version"]
            log.warning("data version %d, named by checkpoint %d, is missing from %s; it is "
                        "being rebuilt from the source as a new version, trained on from the "
                        "next epoch (the result will differ from an uninterrupted run)",
                        self.missing, generation.number, self.versions.folder)
        return version

    def _load(self, version):
        """The Data of `version`, or None if it cannot be read: said once, never tried again,
        and the data source told to make a new version from the source."""
        self.taking = version.number  # kept by the data thread from now on
        try:
            return Data(version)
        except (OSError, ValueError, KeyError) as error:
            if version.number not in self.unusable:
                log.error("data version %d cannot be used (%s); a new one will be made from "
                          "the source", version.number, error)
            self.unusable.add(version.number)
            self.data_damaged(version.number)
            return None

    def _newest(self):
        """The newest data version not known to be unusable (and newer than a missing one
        the checkpoint names: one older than what the model was trained on), or None."""
        for number in self.versions.numbers():
            if number not in self.unusable and number > self.missing:
                version = self.versions.get(number)
                if version is not None and self._usable(version):
                    return version
        return None

    def _wait_for_data(self):
        """The newest usable data version, once there is one; None if stopped first."""
        while not self.stop_event.is_set():
            version = self._newest()
            if version is not None:
                return version
            self.last_progress = time.monotonic()
            self.wake.wait(1.0)
            self.wake.clear()
        return None

    def _newer_version(self):
        numbers = [n for n in self.versions.numbers() if n not in self.unusable]
        if not numbers or numbers[0] <= self.data.version.number:
            return False  # (one listing: no manifest read per epoch)
        newest = self._newest()
        return newest is not None and newest.number > self.data.version.number

    def _take_newest_data(self):
        """At an epoch boundary: move to the newest data version, if there is a newer one.
        One being made (changes seen, not yet in a version) is worth a moment's wait: an
        image that landed during an epoch is trained on in the next."""
        deadline = time.monotonic() + BOUNDARY_WAIT_SECONDS
        while self.data_pending() and time.monotonic() < deadline and \
                not self.stop_event.wait(0.05):
            self.last_progress = time.monotonic()
        if not self._newer_version():
            return
        version = self._newest()
        data = self._load(version) if version is not None else None
        if data is None:
            return
        old, previous = self.data.classes, self.data.version
        self.data = data
        if data.version.same_images(previous):  # made again, as it was deleted: nothing new
            log.info("%s: the same images as data version %d; training goes on with it",
                     data, previous.number)
            self._describe_data()
            self.checkpoint.save(self.epoch, 0, export=False)  # names a version that is there
            return
        self.data_target = max(self.data_target, self.epoch + self.config.train.epochs_per_update)
        self._retarget()
        new = data.classes[len(old):]
        log.info("%s; new classes: %s; training on to epoch %d", data,
                 ", ".join(new) or "none", self.epochs)
        if len(data.classes) > int(self.model.outputs[0].shape[-1]):
            self._widen()
        self._describe_data()

    def _widen(self):
        width = len(self.data.classes)
        log.info("widening the output layer to %d classes (the old ones keep their units)",
                 width)
        self.model = models.widen(self.model, self.config.model, width,
                                  seed=self.config.train.seed)
        self.checkpoint.set_model(self.model)

    def _describe_data(self):
        """Point training at self.data; what checkpoints record of it."""
        train = self.config.train
        self.batches = EpochBatches(self.data.x_train, self.data.y_train, train.batch_size,
                                    train.seed)
        self.checkpoint.extra = {"data_version": self.data.version.number,
                                 "data_kind": data_kind(self.config),
                                 "validation_images": len(self.data.x_val),
                                 "classes": list(self.data.classes),
                                 "images": self.data.version.images,
                                 "skipped_images": len(self.data.version.get("skipped", [])),
                                 "data_target": self.data_target}
        metrics.data_images(self.data.version.images)

    def _validate(self, epoch):
        """Validation loss and accuracy of the model at the end of `epoch`; its confusion
        matrix goes with the checkpoint, for TensorBoard."""
        loss, accuracy, matrix = evaluate(self.model, self.data.x_val, self.data.y_val)
        self.validation_accuracy = accuracy
        self.last_progress = time.monotonic()
        if matrix is not None:
            self.checkpoint.extra["confusion"] = {"epoch": epoch,
                                                  "matrix": matrix.tolist(),
                                                  "classes": list(self.data.classes)}
        return {"val_loss": loss, "val_accuracy": accuracy}

    def _measure(self):
        """Recorded with each epoch, for TensorBoard: images labelled since the last one
        ended (so each sidecar this process writes while training counts once)."""
        now = self.labelled()
        count, self._labelled_before = now - self._labelled_before, now
        return {"images_labelled": count}

    def _draw(self, history):
        """An epoch's checkpoint committed: its TensorBoard curves."""
        self.curves.draw(history, self.checkpoint.extra.get("confusion"))

    def _report_test_accuracy(self):
        data = self.data
        if data.x_test is None:
            return
        started = time.monotonic()
        loss, accuracy = self.model.evaluate(
            models.as_input(data.x_test), data.y_test, batch_size=256, verbose=0,
            callbacks=[Progress(self)])
        log.info("training done: %d epochs; test loss %.4f accuracy %.4f on %d images "
                 "(%.1f s)", self.epoch, loss, accuracy, len(data.x_test),
                 time.monotonic() - started)
