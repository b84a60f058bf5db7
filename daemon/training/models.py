"""Model presets. `mlp` and `cnn` learn from 28x28 gray images; a backbone preset
(`efficientnet_lite0`) trains only its head, on the features its frozen backbone computed
(daemon.backbone), and is exported whole (backbone + head) by whole().

Layer names are fixed so model.json does not depend on what else the process built before
(Keras numbers unnamed layers from a global counter), and every random initial value comes
from `seed`, not from global state another thread may be using."""

import keras
import numpy as np
from keras import initializers, layers

from daemon.backbone import efficientnet
from daemon.service.config import BACKBONE_MODELS as BACKBONES  # trained on features


def input_spec(name):
    """(shape of one input, dtype) of the model `build(name)` trains: a 28x28 uint8 image,
    or a backbone's float32 features."""
    if name in BACKBONES:
        return (efficientnet.FEATURES,), "float32"
    return (28, 28), "uint8"


def as_input(batch):
    """What the models take: uint8 pixels scaled to [0, 1] as the tutorial does; features
    as they are. Works on numpy arrays and tensors alike."""
    if batch.dtype == np.uint8 or getattr(batch.dtype, "name", None) == "uint8":
        return keras.ops.cast(batch, "float32") / 255.0
    return keras.ops.cast(batch, "float32")


def build(name, seed=0, num_classes=10):
    """A compiled model: `mlp` (the tutorial's network), `cnn` (a small convnet), or a
    backbone preset's head: one softmax layer on its features (a linear probe)."""
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def dense(units, activation, layer_name):
        return layers.Dense(units, activation=activation, name=layer_name,
                            kernel_initializer=initializers.GlorotUniform(seed=next(seeds)))

    def conv(filters, layer_name):
        return layers.Conv2D(filters, 3, activation="relu", name=layer_name,
                             kernel_initializer=initializers.GlorotUniform(seed=next(seeds)))

    if name == "mlp":
        model = keras.Sequential([
            keras.Input((28, 28), name="image"),
            layers.Flatten(name="flatten"),
            dense(128, "relu", "hidden"),
            layers.Dropout(0.2, seed=next(seeds), name="dropout"),
            dense(num_classes, "softmax", "output"),
        ], name="mlp")
    elif name == "cnn":
        model = keras.Sequential([
            keras.Input((28, 28), name="image"),
            layers.Reshape((28, 28, 1), name="channels"),
            conv(32, "conv1"),
            layers.MaxPooling2D(name="pool1"),
            conv(64, "conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.3, seed=next(seeds), name="dropout"),
            dense(128, "relu", "hidden"),
            dense(num_classes, "softmax", "output"),
        ], name="cnn")
    elif name in BACKBONES:
        model = keras.Sequential([
            keras.Input((efficientnet.FEATURES,), name="features"),
            dense(num_classes, "softmax", "output"),
        ], name=f"{name}_head")
    else:
        raise ValueError(f"unknown model preset {name!r}")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def widen(model, name, num_classes, seed=0):
    """`model` with `num_classes` outputs (at least as many as it has): every weight and the
    optimizer's state carried over, the old classes keeping their units and indices; a new
    unit starts from the wider model's seeded initial weights (bias 0), its optimizer
    moments at 0. The result is a new compiled model."""
    wider = build(name, seed=seed, num_classes=num_classes)
    for each in (model, wider):
        if not each.optimizer.built:
            each.optimizer.build(each.trainable_variables)
    pairs = [(model.variables, wider.variables, False),
             (model.optimizer.variables, wider.optimizer.variables, True)]
    for old_group, new_group, zeros in pairs:
        if len(old_group) != len(new_group):
            raise ValueError("cannot widen: the models differ in more than their output")
        for old, new in zip(old_group, new_group):
            value = old.numpy()
            if tuple(old.shape) != tuple(new.shape):
                grown = np.zeros(new.shape, value.dtype) if zeros else new.numpy()
                if value.shape[:-1] != grown.shape[:-1] or value.shape[-1] > grown.shape[-1]:
                    raise ValueError(f"cannot widen {old.path} from {value.shape} to "
                                     f"{grown.shape}")
                grown[..., : value.shape[-1]] = value
                value = grown
            new.assign(value)
    return wider


def whole(backbone, head):
    """The backbone preset as one model, RGB 0..255 image in, classes out: `backbone`'s
    layers (frozen) and `head`'s output layer, shared (not copied): it is what model.json
    and model.h5 hold, and follows the head's weights as they train."""
    backbone.trainable = False
    return keras.Model(backbone.input, head.get_layer("output")(backbone.output),
                       name=head.name.removesuffix("_head"))
