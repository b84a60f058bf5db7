"""Model presets. Layer names are fixed so model.json does not depend on what else the
process built before (Keras numbers unnamed layers from a global counter), and every random
initial value comes from `seed`, not from global state another thread may be using."""

import keras
from keras import initializers, layers


def build(name, seed=0, num_classes=10):
    """A compiled model: `mlp` (the tutorial's network) or `cnn` (a small convnet)."""
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
    else:
        raise ValueError(f"unknown model preset {name!r}")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
