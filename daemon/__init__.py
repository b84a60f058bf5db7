"""Wardrobe: a daemon that trains a Keras image classifier with crash-safe checkpoints.

daemon.data (source -> data versions) feeds daemon.training (data version -> checkpoints in
save/), whose checkpoints daemon.inbox labels the inbox with (image files -> sidecars);
daemon.service runs them (lifecycle, config, systemd, logs, metrics, status) and
daemon.__main__ is the command line. Here at the top: the low-level pieces every part uses
-- errors, fsutil (atomic writes, locks), mounts, shares (folders that may hang), sequence.
"""

import os

__version__ = "0.1.0"

# The decompression-bomb cap of daemon.data.images. OpenCV reads this variable once, when it
# is loaded, and TensorFlow/Keras may load it before daemon.data.images does: set it here,
# the first thing `python -m daemon`, the `wardrobe` script and worker processes import.
# daemon.data.images checks that it is in force.
MAX_IMAGE_PIXELS = 40_000_000
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)
