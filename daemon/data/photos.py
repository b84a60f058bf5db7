"""Photos as photos: any image file -> SIZE x SIZE x 3 uint8 RGB, as a pretrained backbone
wants it. The one preprocessing for a backbone model, of training and inbox images alike; a
plain function with picklable exceptions (those of daemon.data.images), no TensorFlow: it runs in
the decode worker processes.

As seen: EXIF orientation applied (HEIF's rotation and mirroring too). Colour: gray becomes
three channels, alpha is composited over white, 16-bit and float images are scaled to 8 bits.
Aspect kept: the centred square of the short side, resized to SIZE (bench/photo_aspect.py
measured it against padding: see ASPECTS). A JPEG is decoded reduced, at the coarsest of
1/8, 1/4 and 1/2 that leaves its short side at least SIZE: libjpeg scales in the DCT, and a
12-megapixel phone photo decodes in half the time at 1/8 (bench/photo_decode.py).
"""

import hashlib
import logging
import re

import cv2
import numpy as np

from daemon.data import images
from daemon.service import logs

log = logging.getLogger("daemon.photos")  # the name users see: daemon.service.logs

SIZE = 224  # EfficientNet-Lite0's input
JPEG_COLOUR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
               4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# How a photo that is not square becomes a square: its centred square ("crop"), or the whole
# photo on a square canvas ("pad-*": mid-gray, black, or its edges repeated).
ASPECTS = {"crop": None, "pad-gray": (cv2.BORDER_CONSTANT, 128),
           "pad-black": (cv2.BORDER_CONSTANT, 0), "pad-edge": (cv2.BORDER_REPLICATE, 0)}
ASPECT = "crop"
# A marker in a JPEG's entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart
# marker (they sit inside scans) nor another 0xFF (fill bytes before a marker).
# Start of frame: baseline, extended, progressive, lossless... (not DHT C4, JPG C8, DAC CC).
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def load(path, size=SIZE):
    """A file -> (size, size, 3) uint8 RGB as seen, aspect kept. Raises images.BadImage (a
    verdict on the content) or images.Unreadable (may go away: try again later)."""
    return fit(decode(images.read_file(path), size, path), size)


def load_for_training(path, size=SIZE, known=()):
    """load(), plus what a data version records of the file: (pixels, sha256 of the bytes
    read, os.stat_result of the file as read). Pixels are None, not decoded, for content
    whose sha256 is in `known` (a copy of an image already featurized)."""
    data, info = images.read_file(path, with_info=True)
    digest = hashlib.sha256(data).hexdigest()
    return (None if digest in known else fit(decode(data, size, path), size)), digest, info


def decode(data, size=SIZE, path=""):
    """Bytes -> uint8 RGB as seen, its short side still at least `size` if the file's was (a
    JPEG is decoded reduced as far as that allows)."""
    # libpng writes its warnings and errors to fd 2 itself: logged at DEBUG
    with logs.captured(log, logging.DEBUG, f"{path}: " if path else ""):
        if data.startswith(b"\xff\xd8\xff"):
            return cv2.cvtColor(_jpeg(data, size), cv2.COLOR_BGR2RGB)
        image = images.decode_as_seen(data)
    if image.dtype == np.uint8 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(images.to_8bit(image, colour=True), cv2.COLOR_BGR2RGB)


def fit(rgb, size=SIZE, aspect=ASPECT):
    """An RGB image of any size -> (size, size, 3): shrunk by area averaging, enlarged by
    bilinear interpolation, made square as `aspect` says (one of ASPECTS)."""
    height, width = rgb.shape[:2]
    border = ASPECTS[aspect]
    if border is None:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resized(rgb[top: top + side, left: left + side], size, size)
    scale = size / max(height, width)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = _resized(rgb, new_width, new_height)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    kind, value = border
    return cv2.copyMakeBorder(resized, top, size - new_height - top, left,
                              size - new_width - left, kind, value=(value,) * 3)


def _jpeg(data, size):
    """A JPEG at the coarsest reduction whose short side is at least `size`, known from its
    frame header (libjpeg's reduced sides round up). OpenCV applies the EXIF orientation
    with the reduced flags too."""
    short = min(_frame_size(data)) or 1
    reduction = next(r for r in (8, 4, 2, 1) if r == 1 or -(-short // r) >= size)
    return images._imdecode(data, JPEG_COLOUR[reduction])


def _resized(image, width, height):
    if (width, height) == image.shape[1::-1]:
        return np.ascontiguousarray(image)
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _frame_size(data):
    """(height, width) of a JPEG as stored, from its frame header ((0, 0) if it has none);
    BadImage if its segments and scans do not lead to its end-of-image marker. libjpeg
    decodes a truncated file without an error, its missing rows gray: a photo silently wrong.
    Segments are skipped by their lengths (an EXIF thumbnail has markers of its own), scans
    up to their next marker; data after the end (a phone's motion photo) is not looked at."""
    position, end, frame = 2, len(data), (0, 0)
    while position + 4 <= end:
        marker = data[position + 1] if data[position] == 0xFF else None
        if marker is None or marker == 0xFF:  # stray bytes or fill: on to the next marker
            found = _MARKER.search(data, position + 1)
            if found is None:
                break
            position = found.start()
        elif marker == 0xD9:
            return frame
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            position += 2
        else:
            if marker in SOF_MARKERS and frame == (0, 0) and position + 9 <= end:
                frame = (int.from_bytes(data[position + 5: position + 7], "big"),
                         int.from_bytes(data[position + 7: position + 9], "big"))
            position += 2 + int.from_bytes(data[position + 2: position + 4], "big")
            if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
                found = _MARKER.search(data, position)
                if found is None:
                    break
                position = found.start()
    if data[position: position + 2] == b"\xff\xd9":
        return frame
    raise images.BadImage("truncated JPEG: it ends before its end-of-image marker")
