"""Model presets. Layer names are fixed so model.json does not depend on what else the
process built before (Keras numbers unnamed layers from a global counter)."""

import keras
from keras import layers


def build(name, num_classes=10):
    """A compiled model: `mlp` (the tutorial's network) or `cnn` (a small convnet)."""
    if name == "mlp":
        model = keras.Sequential([
            keras.Input((28, 28), name="image"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="hidden"),
            layers.Dropout(0.2, name="dropout"),
            layers.Dense(num_classes, activation="softmax", name="output"),
        ], name="mlp")
    elif name == "cnn":
        model = keras.Sequential([
            keras.Input((28, 28), name="image"),
            layers.Reshape((28, 28, 1), name="channels"),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.3, name="dropout"),
            layers.Dense(128, activation="relu", name="hidden"),
            layers.Dense(num_classes, activation="softmax", name="output"),
        ], name="cnn")
    else:
        raise ValueError(f"unknown model preset {name!r}")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
