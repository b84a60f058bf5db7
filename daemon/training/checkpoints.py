"""A Keras callback that checkpoints to the crash-safe store and resumes exactly.

    model.fit(x, y, callbacks=[daemon.training.checkpoints.Checkpoint("save/")])

Like keras.callbacks.BackupAndRestore, but a kill at any instant leaves save/ loadable, and
a resumed run continues at the saved batch with the optimizer, the layers' RNG state (Dropout)
and the epoch's metric accumulators restored, so it ends bit-identical to a run never
interrupted -- provided each epoch's batch order depends only on the epoch number (pass
shuffle=False and order the data per epoch from a seed, as daemon.training.training does) and
steps_per_execution is 1. `save/model.json` + `save/model.h5` always load with the
tutorial's `model_from_json(...)` then `load_weights("save/model.h5")`.
"""

import datetime
import io
import logging
import time

import keras
import numpy as np

from daemon import fsutil
from daemon.errors import IncompatibleCheckpoint
from daemon.service import metrics
from daemon.training.store import CheckpointStore

log = logging.getLogger("daemon.checkpoints")  # the name users see: daemon.service.logs

# Groups of variables a generation holds, in a fixed order.
_GROUPS = ("model", "optimizer", "metrics")


class Checkpoint(keras.callbacks.Callback):
    """Checkpoint at every epoch end, every `every_batches` batches, and where fit stops."""

    def __init__(self, folder, every_batches=None, fingerprint=None):
        super().__init__()
        self.store = CheckpointStore(folder)
        self.every_batches = every_batches
        self.fingerprint = dict(fingerprint or {})
        self.extra = {}  # more for the manifest (the trainer's data version and classes)
        # optional: (epoch) -> {"val_loss": .., "val_accuracy": ..} at the end of an epoch
        self.validate = None
        self.measure = None  # optional: () -> {name: number} more to record with an epoch
        self.after_epoch = None  # optional: (history) -> None once an epoch's generation commits
        # optional: (model) -> the model model.json + model.h5 hold (a backbone's whole
        # model around the head being trained)
        self.exported = None
        self._exporting = None  # _Exports of the model exported last
        self.history = []  # one dict per completed epoch
        self.unsaved = 0  # batches trained since the last generation was written
        self.last_write_ms = None
        self.write_times_ms = []  # since the last epoch end, for the epoch log line
        self.restored = None  # the Generation resumed from, if any
        self._resume = None  # (epoch, step) found by restore()
        self._pending = None  # the same, until the first on_train_begin applies it
        self._epoch = 0
        self._step = 0
        self._skip_below = 0  # batches of this epoch an earlier run already trained on
        self._arrays = None  # the restored state, reapplied once fit has built its metrics

    # ---- resume ----------------------------------------------------------------------------

    def restore(self, generation=None, inside_epoch=True):
        """Load the newest verified generation (or `generation`) into the model, once.

        Returns (epoch, step): completed epochs and batches done in the next one. Without
        `inside_epoch` an interrupted epoch starts again at its first batch (from the saved
        weights): its position means nothing on other data.
        """
        if self._resume is not None:
            return self._resume
        if generation is None:
            generation, damaged = self.store.scan()
            for number, why in damaged:
                log.warning("checkpoint %d in %s is unusable (%s); using an older one",
                            number, self.store.folder, why)
        self._resume = (0, 0)
        if generation is None:
            return self._resume
        self._check_compatible(generation)
        self._arrays = np.load(io.BytesIO(generation.read_state()), allow_pickle=False)
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self._assign_state(metrics=False)
        self.history = [dict(entry) for entry in generation.get("history", [])]
        if generation["step"] == 0 and self.history and generation.get("write_seconds"):
            # an epoch's end: its own cost is in its manifest, not yet in a history
            self.history[-1].setdefault("checkpoint_seconds", generation["write_seconds"])
        self.restored = generation
        metrics.checkpoint_restored(datetime.datetime.fromisoformat(
            generation["written_at"]).timestamp())
        step = self._step_for_batch_size(generation) if inside_epoch else 0
        self._resume = self._pending = (generation["epoch"], step)
        stale = self.store.adopt(generation)
        if stale:
            log.warning("%s did not match checkpoint %d; rewriting from it",
                        ", ".join(stale), generation.number)
            self.store.write_exports(*self._exports())
        return self._resume

    def _check_compatible(self, generation):
        shapes = _shapes(self.model.variables)
        if generation.get("variables") != shapes:
            raise IncompatibleCheckpoint(
                f"{self.store.folder} holds a checkpoint of another architecture "
                f"(model {generation.get('fingerprint', {}).get('model', '?')!r}); "
                "move it away or point `save` elsewhere to start afresh")
        previous = generation.get("fingerprint", {})
        changed = sorted(k for k in self.fingerprint if previous.get(k) != self.fingerprint[k])
        if changed:
            log.warning("resuming with a changed %s (was %s); the result will differ from "
                        "an uninterrupted run", ", ".join(changed),
                        ", ".join(f"{k}={previous.get(k)!r}" for k in changed))

    def _step_for_batch_size(self, generation):
        """Batches done in the current epoch, converted if train.batch_size changed."""
        old = generation.get("fingerprint", {}).get("batch_size")
        new = self.fingerprint.get("batch_size")
        if old and new and old != new:
            return generation["step"] * old // new
        return generation["step"]

    # ---- Keras callback hooks --------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self.restore()
        if self._pending is None:
            return
        epoch, step = self._pending
        self._pending = None
        if epoch > 0:
            self.model._initial_epoch = epoch  # read by fit before its epoch loop
        self._skip_below = step
        if step:
            self._skip_batches(step)

    def on_epoch_begin(self, epoch, logs=None):
        self.model._initial_epoch = None  # a later fit() must not start there again
        self._epoch, self._step = epoch, 0
        self._epoch_started = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if batch < self._skip_below:
            return
        self.unsaved += 1
        self._step = batch + 1
        steps = self.params.get("steps")
        if self.every_batches and self._step % self.every_batches == 0 and self._step != steps:
            self.save(self._epoch, self._step, export=False)

    def on_epoch_end(self, epoch, logs=None):
        self._skip_below = 0
        steps = self.params.get("steps")
        complete = self._step == steps if steps else not self.model.stop_training
        if not complete:
            return  # stopped mid-epoch; on_train_end saves the batch reached
        logs = logs or {}
        scores = self.validate(epoch + 1) if self.validate else {}
        measured = self.measure() if self.measure else {}
        self.history.append({
            "epoch": epoch + 1,
            "loss": _number(logs.get("loss")),
            "accuracy": _number(logs.get("accuracy")),
            **{key: _number(value) for key, value in {**scores, **measured}.items()},
            "seconds": round(time.monotonic() - self._epoch_started, 3),
        })
        self._step = 0
        self._epoch = epoch + 1
        generation = self.save(epoch + 1, 0, scores=scores)
        if generation is None:
            return
        self.history[-1]["checkpoint_seconds"] = generation["write_seconds"]
        if self.after_epoch:
            self.after_epoch(self.history)

    def on_train_end(self, logs=None):
        if self._step:
            self.save(self._epoch, self._step)

    # ---- writing ---------------------------------------------------------------------------

    def save(self, epoch, step, export=True, scores=None):
        """Write a generation for `epoch` completed epochs and `step` batches, with
        model.json + model.h5 unless `export` is false (periodic mid-epoch checkpoints keep
        their cost low). `scores`, the validation of these very weights, makes it a
        contestant for the best checkpoint. Never raises for I/O errors: the previous
        generation stays."""
        started = time.monotonic()
        last = self.history[-1] if self.history else {}
        scores = scores or {}
        meta = {
            **self.extra,
            "epoch": epoch, "step": step, "epochs": (self.params or {}).get("epochs"),
            "loss": last.get("loss"), "accuracy": last.get("accuracy"),
            "validation_loss": _number(scores.get("val_loss")),
            "validation_accuracy": _number(scores.get("val_accuracy")),
            "history": self.history, "fingerprint": self.fingerprint,
            "variables": _shapes(self.model.variables),
        }
        # The first generation writes the tutorial's pair even inside an epoch: from the
        # first checkpoint on, save/ always holds a loadable model.json + model.h5.
        export = export or not self.store.has_exports()
        exports, digests = self._exports() if export else ({}, {})
        try:
            generation = self.store.write(meta, self._state_bytes(), exports, started=started,
                                          digests=digests)
        except OSError as error:
            log.error("checkpoint at epoch %d batch %d failed: %s; the previous one stays",
                      epoch, step, error)
            metrics.checkpoint_failed()
            return None
        self.unsaved = 0
        self.last_write_ms = (time.monotonic() - started) * 1000
        metrics.checkpoint_written(self.last_write_ms / 1000)
        self.write_times_ms.append(self.last_write_ms)
        log.debug("checkpoint %d (epoch %d, batch %d) in %.1f ms",
                  generation.number, epoch, step, self.last_write_ms)
        return generation

    def _state_bytes(self):
        arrays = {}
        groups = (self.model.variables, self.model.optimizer.variables,
                  self.model.metrics_variables)
        for group, variables in zip(_GROUPS, groups):
            for index, variable in enumerate(variables):
                arrays[f"{group}.{index}"] = variable.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def _exports(self):
        """({name: bytes}, {name: digest}) of model.json and model.h5."""
        model = self.exported(self.model) if self.exported else self.model
        if self._exporting is None or self._exporting.model is not model:
            self._exporting = _Exports(model)  # a new model (widened): made afresh
        return self._exporting.files()

    def _assign_state(self, metrics):
        groups = [self.model.variables, self.model.optimizer.variables]
        if metrics:
            groups.append(self.model.metrics_variables)
        for group, variables in zip(_GROUPS, groups):
            for index, variable in enumerate(variables):
                variable.assign(self._arrays[f"{group}.{index}"])

    def _skip_batches(self, count):
        """Make fit pass over the first `count` batches of the resumed epoch.

        The epoch's metric accumulators can only be restored once fit has built its metrics,
        which Keras does when it first traces the train step. So the first skipped batch runs
        a real step (tracing it), whose every effect the restore then overwrites; the others
        are just drawn from the iterator.
        """
        model = self.model
        train = model.train_function
        remaining = [count]

        def skipping_train_function(iterator):
            if remaining[0] == count:
                train(iterator)
                self._assign_state(metrics=True)
            elif remaining[0] == 0:
                model.train_function = train
                return train(iterator)
            else:
                next(iterator)
            remaining[0] -= 1
            return {}

        model.train_function = skipping_train_function


class _Exports:
    """model.json + model.h5 (the classic Keras HDF5 weights layout, which Keras 3 still
    loads from a `.h5` name) of one model, made again at each save only where they can have
    changed: the JSON (the architecture) once; the HDF5 file built once, in memory, and at
    each save the trainable layers' weights written over their own bytes in it (datasets
    are stored contiguously, at fixed offsets). A frozen backbone's 3.4 M weights are not
    serialised every epoch: it cost 6-10x the disk's time."""

    def __init__(self, model):
        import h5py

        self.model = model
        self.json = model.to_json().encode()
        # An in-memory HDF5 file: faster than h5py on a BytesIO, and never touches the disk
        with h5py.File(f"model-{id(self)}.h5", "w", driver="core",
                       backing_store=False) as file:
            file.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
            file.attrs["backend"] = keras.backend.backend().encode()
            file.attrs["keras_version"] = keras.__version__.encode()
            for layer in model.layers:
                group = file.create_group(layer.name)
                weights = _layer_weights(layer)
                names = [weight.path.encode() for weight in weights]
                group.attrs["weight_names"] = np.array(names, dtype="S")
                for name, weight in zip(names, weights):
                    group.create_dataset(name, data=weight.numpy())
            file.flush()
            self.image = bytearray(file.id.get_file_image())
            self.digests = {"model.json": fsutil.BlockDigest(self.json),
                            "model.h5": fsutil.BlockDigest(self.image)}
            self.changing = []  # (offset in the file, dtype, variable) of trainable weights
            for layer in model.layers:
                for weight in _layer_weights(layer) if layer.trainable else ():
                    dataset = file[layer.name][weight.path.encode()]
                    offset = dataset.id.get_offset()
                    if offset is None:  # not stored contiguously: h5py's default is
                        raise ValueError(f"{weight.path}: no contiguous storage in model.h5")
                    self.changing.append((offset, dataset.dtype, weight))

    def files(self):
        """({name: data}, {name: digest}); the data is this object's own buffer, valid until
        the next call (the store writes it at once)."""
        for offset, dtype, weight in self.changing:
            value = np.ascontiguousarray(weight.numpy(), dtype=dtype)  # HDF5's own layout
            self.image[offset: offset + value.nbytes] = value.tobytes()
            self.digests["model.h5"].changed(offset, offset + value.nbytes)
        return ({"model.json": self.json, "model.h5": self.image},
                {name: digest.hexdigest() for name, digest in self.digests.items()})


def _layer_weights(layer):
    return layer.trainable_weights + layer.non_trainable_weights


def _shapes(variables):
    return [list(variable.shape) for variable in variables]


def _number(value):
    return None if value is None else round(float(value), 6)
