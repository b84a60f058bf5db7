"""The model that labels: the best checkpoint so far (or the newest), as one compiled
batch predict.

The classifier keeps its own copy of the model, loaded from a verified generation (never a
half-written one) and reloaded when the choice changes, at most once per generation and
only when there is something to label. Images that come before the first checkpoint wait.
"""

import io
import logging

import numpy as np
import tensorflow as tf

from daemon.data import images, photos
from daemon.service.config import NUM_CLASSES
from daemon.training import models
from daemon.training.store import CheckpointStore

log = logging.getLogger("daemon.classifier")  # the name users see: daemon.service.logs


class Classifier:
    """The labelling checkpoint's model as one compiled function over batches of 28x28
    images: the best so far by validation accuracy (classify.checkpoint: best), or the
    newest. Its width and class names come with the checkpoint (a folder source grows)."""

    def __init__(self, config):
        self.config = config
        self.store = CheckpointStore(config.save)
        self.model = None
        self.generation = None
        self._seen = None  # the generation numbers in save/ when we last chose
        self._prefer = config.classify.checkpoint
        self._featurizer = None  # a backbone model's, for files read in this process

    @property
    def labels(self):
        if self.config.data.source == "folder" and self.generation.get("classes"):
            return self.generation["classes"]
        return self.config.classify.labels  # a reload may rename them

    def refresh(self):
        """Load the labelling generation if it changed; True if we have one."""
        # Committed ones only: a state file seen before its manifest, then committed, is no
        # change of listing, and that generation (the only one, say) would never be taken
        numbers = self.store.committed()
        if numbers != self._seen or (self.generation is not None and
                                     self._prefer != self.config.classify.checkpoint):
            chosen = self.store.labelling(self.config.classify.checkpoint)
            if chosen is not None and (self.generation is None
                                       or chosen.id != self.generation.id):
                try:
                    self._load(chosen)
                except (OSError, ValueError, KeyError) as error:  # removed meanwhile
                    log.debug("could not load checkpoint %d: %s", chosen.number, error)
                    return self.generation is not None
            self._seen, self._prefer = numbers, self.config.classify.checkpoint
        return self.generation is not None

    def _load(self, generation):
        width = len(generation.get("classes") or ()) or NUM_CLASSES
        if self.model is None or int(self.model.outputs[0].shape[-1]) != width:
            self.model = models.build(self.config.model, num_classes=width)
            model = self.model
            shape, dtype = models.input_spec(self.config.model)
            self._predict = tf.function(  # as in training
                lambda batch: model(models.as_input(batch), training=False),
                input_signature=[tf.TensorSpec([None, *shape], dtype)], reduce_retracing=True)
        with np.load(io.BytesIO(generation.read_state()), allow_pickle=False) as arrays:
            for index, variable in enumerate(self.model.variables):
                variable.assign(arrays[f"model.{index}"])
        first, self.generation = self.generation is None, generation
        # Reloads follow every checkpoint while training: INFO for the first one only.
        score = generation.get("validation_accuracy")
        log.log(logging.INFO if first else logging.DEBUG,
                "labelling with checkpoint %d (epoch %d, batch %d%s)", generation.number,
                generation["epoch"], generation["step"],
                f", validation accuracy {score:.4f}" if score is not None else "")

    def results(self, batch):
        """A list of 28x28 uint8 images -> one sidecar record each (label, class, ...)."""
        probabilities = self._predict(tf.constant(np.stack(batch))).numpy()
        return [{"label": self.labels[cls], "class": int(cls),
                 "confidence": round(float(row[cls]), 4),
                 "epoch": self.generation["epoch"], "model": self.generation.id}
                for row, cls in zip(probabilities, probabilities.argmax(axis=1))]

    def read(self, path):
        """A file -> what results() takes, in this process (`classify`, and `relabel` while
        the daemon is down): a 28x28 image, or a photo's features from the backbone's
        runtime (as the decode workers compute them). Raises images.BadImage/Unreadable."""
        if self.config.model not in models.BACKBONES:
            return images.load(path)
        if self._featurizer is None:
            from daemon.backbone import runtime

            prepared = runtime.prepare(self.config.save, runtime.locate(self.config.weights))
            self._featurizer = prepared.load()
        return self._featurizer(photos.load(path))


def classify_files(config, paths, out, err):
    """`wardrobe classify FILE...`: print FILE<TAB>label<TAB>confidence; 1 if any failed."""
    classifier = Classifier(config)
    if not classifier.refresh():
        print(f"wardrobe: no checkpoint in {config.save} yet", file=err)
        return 1
    loaded, failed = [], 0
    for path in paths:
        try:
            loaded.append((path, classifier.read(path)))
        except (images.BadImage, images.Unreadable) as error:
            print(f"{path}: {error}", file=err)
            failed += 1
    if loaded:
        for (path, _), result in zip(loaded, classifier.results([image for _, image in loaded])):
            print(f"{path}\t{result['label']}\t{result['confidence']:.4f}", file=out)
    return 1 if failed else 0
