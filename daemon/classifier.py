"""The model that labels: the newest complete checkpoint, as one compiled batch predict.

The classifier keeps its own copy of the model, loaded from a verified generation (never a
half-written one) and reloaded when a newer one lands, at most once per generation and
only when there is something to label. Images that come before the first checkpoint wait.
"""

import io
import logging

import numpy as np
import tensorflow as tf

from daemon import images, models
from daemon.store import CheckpointStore

log = logging.getLogger(__name__)


class Classifier:
    """The newest checkpoint's model as one compiled function over batches of 28x28 images."""

    def __init__(self, config):
        self.labels = config.classify.labels
        self.store = CheckpointStore(config.save)
        self.model = models.build(config.model)
        self.generation = None
        self._predict = tf.function(  # scaled to [0, 1] as in training
            lambda batch: self.model(tf.cast(batch, tf.float32) / 255.0, training=False),
            input_signature=[tf.TensorSpec([None, images.SIDE, images.SIDE], tf.uint8)],
            reduce_retracing=True)

    def refresh(self):
        """Load the newest verified generation if it is newer than ours; True if we have one."""
        numbers = self.store.numbers()
        if numbers and (self.generation is None or numbers[0] > self.generation.number):
            newest, _ = self.store.scan()
            if newest is not None and (self.generation is None
                                       or newest.number > self.generation.number):
                try:
                    self._load(newest)
                except (OSError, ValueError, KeyError) as error:  # removed or replaced meanwhile
                    log.warning("could not load checkpoint %d: %s", newest.number, error)
        return self.generation is not None

    def _load(self, generation):
        with np.load(io.BytesIO(generation.read_state()), allow_pickle=False) as arrays:
            for index, variable in enumerate(self.model.variables):
                variable.assign(arrays[f"model.{index}"])
        first, self.generation = self.generation is None, generation
        # Reloads follow every checkpoint while training: INFO for the first one only.
        log.log(logging.INFO if first else logging.DEBUG,
                "labelling with checkpoint %d (epoch %d, batch %d)", generation.number,
                generation["epoch"], generation["step"])

    def results(self, batch):
        """A list of 28x28 uint8 images -> one sidecar record each (label, class, ...)."""
        probabilities = self._predict(tf.constant(np.stack(batch))).numpy()
        return [{"label": self.labels[cls], "class": int(cls),
                 "confidence": round(float(row[cls]), 4),
                 "epoch": self.generation["epoch"], "model": self.generation.id}
                for row, cls in zip(probabilities, probabilities.argmax(axis=1))]


def classify_files(config, paths, out, err):
    """`wardrobe classify FILE...`: print FILE<TAB>label<TAB>confidence; 1 if any failed."""
    classifier = Classifier(config)
    if not classifier.refresh():
        print(f"wardrobe: no checkpoint in {config.save} yet", file=err)
        return 1
    loaded, failed = [], 0
    for path in paths:
        try:
            loaded.append((path, images.load(path)))
        except (images.BadImage, images.Unreadable) as error:
            print(f"{path}: {error}", file=err)
            failed += 1
    if loaded:
        for (path, _), result in zip(loaded, classifier.results([image for _, image in loaded])):
            print(f"{path}\t{result['label']}\t{result['confidence']:.4f}", file=out)
    return 1 if failed else 0
