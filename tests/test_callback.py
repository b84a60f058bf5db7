"""daemon.training.checkpoints.Checkpoint in anyone's model.fit, in this process."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from daemon.data import dataset
from daemon.training import models
from daemon.training.checkpoints import Checkpoint


@pytest.fixture(scope="module")
def data():
    sample = dataset.load("sample")
    return sample.x_train[:512].astype("float32") / 255.0, sample.y_train[:512]


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.model.stop_training = True


class Count(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def fresh_model(seed):
    keras.utils.set_random_seed(seed)
    return models.build("mlp", seed=seed)


def test_resume_mid_epoch_in_plain_fit_is_bit_identical(tmp_path, data):
    tf.config.experimental.enable_op_determinism()
    x, y = data
    fit = dict(batch_size=8, epochs=3, shuffle=False, verbose=0)

    reference = fresh_model(1)
    history = reference.fit(x, y, **fit)

    interrupted = fresh_model(1)
    interrupted.fit(x, y, callbacks=[StopAt(1, 20), Checkpoint(tmp_path)], **fit)
    resumed = fresh_model(99)  # other initial weights and Dropout seed: all must be restored
    counter = Count()
    resumed_history = resumed.fit(x, y, callbacks=[Checkpoint(tmp_path), counter], **fit)

    assert counter.epochs == [1, 2]
    for mine, theirs in zip(resumed.variables + resumed.optimizer.variables,
                            reference.variables + reference.optimizer.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    # the resumed epoch's metrics cover the whole epoch, batches before the stop included
    assert resumed_history.history["loss"] == history.history["loss"][1:]
    assert resumed_history.history["accuracy"] == history.history["accuracy"][1:]


def test_finished_training_is_not_repeated_and_more_epochs_continue(tmp_path, data):
    x, y = data
    first = fresh_model(3)
    first.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0,
              callbacks=[Checkpoint(tmp_path)])
    again, counter = fresh_model(4), Count()
    again.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0,
              callbacks=[Checkpoint(tmp_path), counter])
    assert counter.epochs == []
    np.testing.assert_array_equal(again.layers[-1].kernel.numpy(),
                                  first.layers[-1].kernel.numpy())
    more = Count()
    again.fit(x, y, batch_size=64, epochs=4, shuffle=False, verbose=0,
              callbacks=[Checkpoint(tmp_path), more])
    assert more.epochs == [2, 3]
    assert int(again.optimizer.iterations.numpy()) == 4 * 8
