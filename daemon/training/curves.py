"""TensorBoard curves in save/tensorboard/: `tensorboard --logdir save/tensorboard`.

Two runs, as Keras's own TensorBoard callback lays them out: train/ (epoch_loss,
epoch_accuracy; checkpoint_seconds, the time to write the epoch's checkpoint up to its
manifest; images_labelled, sidecars written while the epoch trained) and validation/
(epoch_loss, epoch_accuracy, and the confusion matrix as an image). The step is the epoch
number (1 for the first).

The checkpoints are the truth and the curves are drawn from them, an event file per run and
epoch, only after that epoch's checkpoint has committed. Each file is written by tf.summary
in save/tmp, fsynced, and renamed into place (then the folder fsynced), so a file in
save/tensorboard is always whole and TensorBoard reads it after a power cut. Each drawing
(at start, and at each epoch end) first removes the files of epochs the checkpoint has not
completed (a rollback to an older generation), then draws, from its history, every epoch
without files (a kill between the commit and the drawing, files deleted): each epoch
appears exactly once.
"""

import logging
import os
import re
import shutil
import time

import cv2
import numpy as np
import tensorflow as tf

from daemon import fsutil

log = logging.getLogger("daemon.curves")  # the name users see: daemon.service.logs

RUNS = ("train", "validation")
_NAME = re.compile(r"^events\.out\.tfevents\.(\d{10})\.wardrobe$")


def file_name(epoch):
    # Sorted by name is sorted by epoch: TensorBoard reads a run's files in name order.
    return f"events.out.tfevents.{epoch:010d}.wardrobe"


class Curves:
    def __init__(self, save):
        self.folder = save / "tensorboard"
        self.scratch = save / "tmp"
        self.failing = False  # said once until the curves can be written again

    def draw(self, history, confusion=None):
        """Make the files match `history` (the epochs of the checkpoint resumed from or just
        written) exactly: remove those of epochs beyond it, write those missing; `confusion`
        ({"epoch", "matrix", "classes"}) adds the picture to its epoch. Never raises for
        I/O errors (the curves are not worth stopping training for): says so once and
        tries again at the next epoch end."""
        try:
            drawn = self._tidy(history[-1]["epoch"] if history else 0)
            for entry in history:
                epoch = entry["epoch"]
                picture = confusion if confusion and confusion.get("epoch") == epoch else None
                if epoch not in drawn["train"]:
                    self._write("train", epoch, _train_scalars(entry))
                if epoch not in drawn["validation"] and (
                        entry.get("val_loss") is not None or picture):
                    self._write("validation", epoch, _validation_scalars(entry), picture)
        except (OSError, tf.errors.OpError) as error:
            if not self.failing:
                log.warning("TensorBoard: cannot write the curves in %s: %s; trying again "
                            "at each epoch end", self.folder, error)
            self.failing = True
            return
        if self.failing:
            log.info("TensorBoard: the curves in %s are complete again", self.folder)
            self.failing = False

    def _tidy(self, last):
        """{run: epochs with a file}, after removing the files of epochs beyond `last`."""
        drawn = {}
        for run in RUNS:
            folder = self.folder / run
            folder.mkdir(parents=True, exist_ok=True)
            drawn[run] = set()
            for name in os.listdir(folder):
                match = _NAME.match(name)
                if match and int(match[1]) > last:
                    os.unlink(folder / name)  # an epoch the checkpoints rolled back
                    fsutil.fsync_folder(folder)
                    log.info("TensorBoard: removed epoch %d of %s (not in the checkpoint "
                             "resumed from)", int(match[1]), run)
                elif match:
                    drawn[run].add(int(match[1]))
        return drawn

    def _write(self, run, epoch, scalars, picture=None):
        started = time.monotonic()
        scratch = self.scratch / f"tensorboard-{run}-{epoch}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            writer = tf.summary.create_file_writer(str(scratch))
            with writer.as_default(step=epoch):
                for tag, value in scalars.items():
                    if value is not None:
                        tf.summary.scalar(tag, value)
                if picture is not None:
                    image, description = confusion_image(picture["matrix"], picture["classes"])
                    # A tag per class count: TensorBoard keeps the first description of a
                    # tag, and classes are only ever added, so the count names the list.
                    tf.summary.image(f"confusion_matrix/{len(picture['classes'])} classes",
                                     image[np.newaxis], description=description)
            writer.close()
            (written,) = os.listdir(scratch)
            source, target = scratch / written, self.folder / run / file_name(epoch)
            with open(source, "rb") as file:
                os.fsync(file.fileno())
            os.replace(source, target)
            fsutil.fsync_folder(target.parent)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.debug("TensorBoard: %s epoch %d in %.1f ms", run, epoch,
                  (time.monotonic() - started) * 1000)


def _train_scalars(entry):
    return {"epoch_loss": entry.get("loss"), "epoch_accuracy": entry.get("accuracy"),
            "checkpoint_seconds": entry.get("checkpoint_seconds"),
            "images_labelled": entry.get("images_labelled")}


def _validation_scalars(entry):
    return {"epoch_loss": entry.get("val_loss"), "epoch_accuracy": entry.get("val_accuracy")}


def confusion(truth, predicted, count):
    """The confusion matrix: rows the true class, columns the predicted one."""
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def confusion_image(matrix, classes):
    """An RGB picture of the matrix (each row shaded by its share of that class, counts
    written in when they fit) and a description naming the classes."""
    matrix = np.asarray(matrix)
    count = len(matrix)
    cell = max(6, min(40, 960 // max(count, 1)))
    margin = 28
    size = margin + cell * count
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, cell / 90
    for row in range(count):
        for column in range(count):
            # Right answers in green, wrong ones in red, the darker the more of the row.
            shade = int(255 * (1 - shares[row, column]))
            colour = (shade, 255, shade) if row == column else (255, shade, shade)
            top, left = margin + row * cell, margin + column * cell
            image[top:top + cell, left:left + cell] = colour
            if cell >= 24 and matrix[row, column]:
                cv2.putText(image, str(matrix[row, column]), (left + 3, top + cell * 2 // 3),
                            font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for index in range(count):
        if cell >= 14:
            centre = margin + index * cell + cell // 3
            cv2.putText(image, str(index), (centre, margin - 8), font, 0.35, (0, 0, 0), 1,
                        cv2.LINE_AA)
            cv2.putText(image, str(index), (3, centre + cell // 3), font, 0.35, (0, 0, 0), 1,
                        cv2.LINE_AA)
    image[margin:, margin - 1] = image[margin - 1, margin:] = 0
    description = ("Rows: the true class; columns: the class predicted, on the validation "
                   "images. " + ", ".join(f"{index}: {name}" for index, name in enumerate(classes)))
    return image, description
