"""The trainer: seeded per-epoch order, exact resume point, cooperative stop.

Each epoch's batch order is a permutation derived from (seed, epoch) alone, so a resumed run
sees the very batches an uninterrupted one would. fit() runs one epoch at a time on a
tf.data pipeline in that order; the Checkpoint callback restores state and skips the
batches already trained on.
"""

import logging
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from daemon import dataset, models
from daemon.checkpoints import Checkpoint

log = logging.getLogger(__name__)


def epoch_order(seed, epoch, count):
    """The permutation of training examples for `epoch`: a function of seed and epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class EpochBatches:
    """The training set, held once as tensors; of_epoch(e) yields its batches in the order
    of epoch_order(seed, e), scaled to [0, 1] as the tutorial does."""

    def __init__(self, data, batch_size, seed):
        self.images = tf.constant(data.x_train)
        self.labels = tf.constant(data.y_train)
        self.batch_size, self.seed = batch_size, seed

    def of_epoch(self, epoch):
        order = epoch_order(self.seed, epoch, int(self.images.shape[0]))
        return (tf.data.Dataset.from_tensor_slices(order)
                .batch(self.batch_size)
                .map(self._gather)
                .prefetch(2))

    def _gather(self, indices):
        images = tf.cast(tf.gather(self.images, indices), tf.float32) / 255.0
        return images, tf.gather(self.labels, indices)


class Trainer:
    """Trains `config.model` up to `epochs` (raised by a reload: training goes on), then
    waits for a new target or a stop. run() blocks; setting stop_event (and wake), from any
    thread, ends it at the next batch boundary with a checkpoint.

    `phase` tells the service what a stop would lose: only in "training" with batches
    trained since the last checkpoint (unsaved()) must it wait; "loading", "evaluating"
    and "idle" have everything on disk already."""

    def __init__(self, config, generation, stop_event):
        self.config = config
        self.generation = generation  # verified checkpoint to resume from, or None
        self.stop_event = stop_event
        self.epochs = config.train.epochs  # the target
        self.wake = threading.Event()  # a new target, or stop
        self.phase = "loading"
        self.epoch = self.step = 0
        self.checkpoint = None
        self.restored = threading.Event()  # the model is ready: set after restore
        self.last_progress = time.monotonic()  # for the watchdog: a batch, an epoch...

    def unsaved(self):
        return self.phase == "training" and self.checkpoint is not None and bool(
            self.checkpoint.unsaved)

    def set_target(self, epochs):
        self.epochs = epochs
        self.wake.set()

    def run(self):
        train = self.config.train
        keras.config.disable_interactive_logging()  # Keras's messages go to logging, not print
        keras.utils.set_random_seed(train.seed)
        tf.config.experimental.enable_op_determinism()
        data = dataset.load(self.config.data.source, self.config.data.path)
        log.info("data: %s", data)
        model = models.build(self.config.model, seed=train.seed)
        checkpoint = Checkpoint(self.config.save, every_batches=train.checkpoint_batches,
                                fingerprint=self.fingerprint(data))
        checkpoint.set_model(model)
        self.epoch, self.step = checkpoint.restore(self.generation)
        self.checkpoint = checkpoint
        self.last_progress = time.monotonic()
        self.restored.set()
        where = "resuming from" if checkpoint.restored else "no checkpoint in"
        log.info("%s %s: epoch %d/%d, batch %d", where, self.config.save, self.epoch,
                 self.epochs, self.step)
        callbacks = [_StopOnEvent(self.stop_event), _Progress(self), checkpoint,
                     _EpochLog(checkpoint, self)]
        batches = EpochBatches(data, train.batch_size, train.seed)
        trained = announced = False
        while not self.stop_event.is_set():
            if self.epoch < self.epochs:
                self.phase = "training"
                epoch = self.epoch
                model.fit(batches.of_epoch(epoch), initial_epoch=epoch, epochs=epoch + 1,
                          shuffle=False, verbose=0, callbacks=callbacks)
                trained = True
                if self.step:  # stopped inside this epoch
                    log.info("stopped at batch %d of epoch %d; checkpoint %.0f ms", self.step,
                             epoch + 1, checkpoint.last_write_ms or 0)
                    return model
                continue
            self.phase = "evaluating"
            if trained:
                self._report_test_accuracy(model, data)
            if self.stop_event.is_set():
                break
            if trained or not announced:
                log.info("training complete (%d epochs); labelling inbox images until "
                         "stopped", self.epoch)
            trained, announced = False, True
            self.phase = "idle"
            self.wake.clear()  # then look again: a new target set just before is not lost
            if self.epoch >= self.epochs and not self.stop_event.is_set():
                self.wake.wait()
            self.last_progress = time.monotonic()
        return model

    def fingerprint(self, data):
        """What a checkpoint must share with this run for the resume to be exact."""
        train = self.config.train
        return {"model": self.config.model, "batch_size": train.batch_size,
                "seed": train.seed, "data": data.digest()}

    def _report_test_accuracy(self, model, data):
        started = time.monotonic()
        loss, accuracy = model.evaluate(data.x_test.astype("float32") / 255.0, data.y_test,
                                        batch_size=256, verbose=0, callbacks=[_Progress(self)])
        log.info("training done: %d epochs; test loss %.4f accuracy %.4f on %d images "
                 "(%.1f s)", self.epoch, loss, accuracy, len(data.x_test),
                 time.monotonic() - started)


class _StopOnEvent(keras.callbacks.Callback):
    """Ends fit at the next batch boundary once the event is set (like TerminateOnNaN)."""

    def __init__(self, event):
        super().__init__()
        self.event = event

    def on_train_batch_end(self, batch, logs=None):
        if self.event.is_set():
            self.model.stop_training = True


class _Progress(keras.callbacks.Callback):
    """Keeps trainer.epoch, .step and .last_progress current (status, watchdog)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_begin(self, epoch, logs=None):
        self.trainer.epoch = epoch
        self.trainer.last_progress = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.trainer.step = batch + 1
        self.trainer.last_progress = time.monotonic()

    def on_test_batch_end(self, batch, logs=None):
        self.trainer.last_progress = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if batch_count := self.params.get("steps"):
            if self.trainer.step >= batch_count:
                self.trainer.epoch, self.trainer.step = epoch + 1, 0


class _EpochLog(keras.callbacks.Callback):
    """One INFO line per completed epoch, with the cost of its checkpoints."""

    def __init__(self, checkpoint, trainer):
        super().__init__()
        self.checkpoint, self.trainer = checkpoint, trainer

    def on_epoch_end(self, epoch, logs=None):
        history = self.checkpoint.history
        if not history or history[-1]["epoch"] != epoch + 1:
            return  # stopped mid-epoch
        last, writes = history[-1], self.checkpoint.write_times_ms
        extra = ""
        if len(writes) > 1:
            extra = f" (+{len(writes) - 1} mid-epoch, mean {np.mean(writes[:-1]):.0f} ms)"
        log.info("epoch %d/%d: loss %.4f accuracy %.4f (%.1f s); checkpoint %.0f ms%s",
                 epoch + 1, self.trainer.epochs, last["loss"], last["accuracy"], last["seconds"],
                 writes[-1] if writes else float("nan"), extra)
        writes.clear()
