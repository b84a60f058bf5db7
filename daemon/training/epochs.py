"""One epoch of training, as the trainer runs it: the batch order of each epoch (a function
of seed and epoch only, so a resumed run sees the very batches an uninterrupted one would),
the Keras callbacks that keep the trainer's progress, log each epoch and stop it at a batch
boundary, and plain evaluation. Used by daemon.training.training.
"""

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from daemon.service import metrics
from daemon.training import models
from daemon.training.curves import confusion

log = logging.getLogger("daemon.training")  # the name users see: daemon.service.logs


def epoch_order(seed, epoch, count):
    """The permutation of training examples for `epoch`: a function of seed and epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class EpochBatches:
    """The training set, held once as tensors; of_epoch(e) yields its batches in the order
    of epoch_order(seed, e), as the model takes them (models.as_input)."""

    def __init__(self, images, labels, batch_size, seed):
        self.images = tf.constant(images)
        self.labels = tf.constant(labels)
        self.batch_size, self.seed = batch_size, seed

    def of_epoch(self, epoch):
        order = epoch_order(self.seed, epoch, int(self.images.shape[0]))
        return (tf.data.Dataset.from_tensor_slices(order)
                .batch(self.batch_size)
                .map(self._gather)
                .prefetch(2))

    def _gather(self, indices):
        return models.as_input(tf.gather(self.images, indices)), tf.gather(self.labels, indices)


def evaluate(model, images, labels, batch_size=1024):
    """(cross-entropy loss, accuracy, confusion matrix) of `model` on its inputs, or
    (None, None, None) for none; plain inference, so it leaves no trace in the model's
    metrics or RNG state."""
    if len(images) == 0:
        return None, None, None
    width = int(model.outputs[0].shape[-1])
    losses, matrix = 0.0, np.zeros((width, width), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        batch = models.as_input(images[start: start + batch_size])
        truth = labels[start: start + batch_size].astype(np.int64)
        probabilities = model(batch, training=False).numpy()
        picked = np.clip(probabilities[np.arange(len(truth)), truth], 1e-7, 1.0)
        losses += float(-np.log(picked.astype(np.float64)).sum())
        matrix += confusion(truth, probabilities.argmax(axis=1), width)
    hits = int(np.trace(matrix))
    return round(losses / len(images), 6), round(hits / len(images), 6), matrix


class StopOnEvent(keras.callbacks.Callback):
    """Ends fit at the next batch boundary once the event is set (like TerminateOnNaN)."""

    def __init__(self, event):
        super().__init__()
        self.event = event

    def on_train_batch_end(self, batch, logs=None):
        if self.event.is_set():
            self.model.stop_training = True


class Progress(keras.callbacks.Callback):
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
        logs = logs or {}
        metrics.batch_trained(batch + 1, logs.get("loss"), logs.get("accuracy"))
        if not self.trainer.trained_once:
            self.trainer.trained_once = True
            log.info("first batch trained (epoch %d, batch %d)", self.trainer.epoch + 1,
                     batch + 1)

    def on_test_batch_end(self, batch, logs=None):
        self.trainer.last_progress = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if batch_count := self.params.get("steps"):
            if self.trainer.step >= batch_count:
                self.trainer.epoch, self.trainer.step = epoch + 1, 0


class EpochLog(keras.callbacks.Callback):
    """One INFO line per completed epoch, with the cost of its checkpoints."""

    def __init__(self, checkpoint, trainer):
        super().__init__()
        self.checkpoint, self.trainer = checkpoint, trainer

    def on_epoch_end(self, epoch, logs=None):
        history = self.checkpoint.history
        if not history or history[-1]["epoch"] != epoch + 1:
            return  # stopped mid-epoch
        last, writes = history[-1], self.checkpoint.write_times_ms
        report_epoch(last)  # saved or not: the checkpoint failures have their own counter
        if "checkpoint_seconds" in last:  # the epoch's own checkpoint was written
            saved, middle = f"checkpoint {writes[-1]:.0f} ms", writes[:-1]
        else:
            saved, middle = "checkpoint failed", writes
        extra = f" (+{len(middle)} mid-epoch, mean {np.mean(middle):.0f} ms)" if middle else ""
        validation = ""
        if last.get("val_accuracy") is not None:
            validation = (f"; validation loss {last['val_loss']:.4f} accuracy "
                          f"{last['val_accuracy']:.4f}")
        log.info("epoch %d/%d: loss %.4f accuracy %.4f%s (%.1f s); %s%s",
                 epoch + 1, self.trainer.epochs, last["loss"], last["accuracy"], validation,
                 last["seconds"], saved, extra)
        writes.clear()


def report_epoch(entry):
    """A completed epoch's numbers to the metrics."""
    metrics.epoch_ended(entry["epoch"], entry.get("loss"), entry.get("accuracy"),
                        entry.get("val_accuracy"))
