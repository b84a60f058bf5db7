"""Wardrobe: a daemon that trains a Keras image classifier with crash-safe checkpoints."""

import os

__version__ = "0.1.0"

# The decompression-bomb cap of daemon.images. OpenCV reads this variable once, when it is
# loaded, and TensorFlow/Keras may load it before daemon.images does: set it here, the first
# thing `python -m daemon`, the `wardrobe` script and worker processes import.
# daemon.images checks that it is in force.
MAX_IMAGE_PIXELS = 40_000_000
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)
