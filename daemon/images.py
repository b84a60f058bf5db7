"""Decode any image OpenCV reads and make it look like a Fashion-MNIST example.

Fashion-MNIST was made from product photos on light backgrounds by trimming the background,
resizing the longest edge to 28, centring on a 28x28 canvas, negating (light object on
dark) and converting to 8-bit gray (its README). We do the same, so a photo gets the label
a dataset crop would. An image that already is a 28x28 light-on-dark crop is used as is.
"""

import os
import stat

# Caps against decompression bombs, set before cv2 is imported (OpenCV reads them once).
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

SIDE = 28
BACKGROUND_TOLERANCE = 0.05 * 255  # the dataset's trimming threshold: 5% of full intensity

cv2.setNumThreads(1)  # many small images: threads cost more than they save


class BadImage(Exception):
    """The file cannot be labelled; the message says why (it goes in the error sidecar)."""


def read_file(path):
    """The bytes of a regular file, never following a symlink and never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == 40:  # ELOOP: the name is a symlink
            raise BadImage("symbolic link: not followed") from None
        raise BadImage(f"cannot open: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadImage("a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise BadImage("not a regular file")
        if info.st_size == 0:
            raise BadImage("empty file")
        if info.st_size > MAX_FILE_BYTES:
            raise BadImage(f"file too large: {info.st_size} bytes (limit {MAX_FILE_BYTES})")
        chunks, remaining = [], info.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise BadImage(f"cannot read: {error.strerror}") from None
    finally:
        os.close(fd)


def decode(data):
    """Bytes -> 2-D uint8 gray image; alpha is composited over white (a product photo's
    background), 16-bit and float images are scaled to 8 bits."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        if "MAX_IMAGE" in str(error):
            raise BadImage(f"image too large: over {MAX_PIXELS} pixels") from None
        raise BadImage(f"cannot decode: {str(error).strip().splitlines()[-1][:200]}") from None
    if image is None or image.size == 0:
        raise BadImage("not a decodable image")
    if image.ndim == 2 and image.dtype == np.uint8:
        return image  # already 8-bit gray: the common case, kept cheap
    image = _to_unit_float(image)
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:4]
        image = image[:, :, :3] * alpha + (1.0 - alpha)
    elif image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        alpha = image[:, :, 1]
        image = image[:, :, 0] * alpha + (1.0 - alpha)
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3].astype(np.float32), cv2.COLOR_BGR2GRAY)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def to_dataset_style(gray):
    """A 2-D uint8 image -> 28x28 uint8, light object on a dark background."""
    corners = sorted(int(v) for v in (gray[0, 0], gray[0, -1], gray[-1, 0], gray[-1, -1]))
    background = (corners[1] + corners[2]) / 2  # their median
    if gray.shape == (SIDE, SIDE) and background < 128:
        return gray  # already a dataset-style crop
    # Trim the edges close to the background colour.
    foreground = np.abs(gray.astype(np.float32) - background) > BACKGROUND_TOLERANCE
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if rows.size and cols.size:
        gray = gray[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    # Light object on a dark background, the background at 0 and the object at full range
    # (dataset images almost all reach 255), whatever the photo's exposure.
    signal = (background - gray.astype(np.float32)) if background >= 128 else (
        gray.astype(np.float32) - background)
    signal = np.clip(signal, 0, None)
    top = float(signal.max())
    gray = np.rint(signal * (255.0 / top)).astype(np.uint8) if top > 0 else np.zeros_like(gray)
    height, width = gray.shape
    scale = SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(gray, size, interpolation=interpolation)
    canvas = np.zeros((SIDE, SIDE), dtype=np.uint8)
    top, left = (SIDE - size[1] + 1) // 2, (SIDE - size[0] + 1) // 2  # as the dataset rounds
    canvas[top: top + size[1], left: left + size[0]] = resized
    return canvas


def load(path):
    """A file -> 28x28 uint8, ready for the model (after /255). Raises BadImage."""
    return to_dataset_style(decode(read_file(path)))


def _to_unit_float(image):
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype in (np.float32, np.float64):
        image = np.nan_to_num(image.astype(np.float32))
        top = float(image.max())
        return image / top if top > 1.0 else np.clip(image, 0.0, 1.0)
    info = np.iinfo(image.dtype) if np.issubdtype(image.dtype, np.integer) else None
    if info is None:
        raise BadImage(f"unsupported pixel type {image.dtype}")
    return (image.astype(np.float64) - info.min) / (info.max - info.min)


class Unreadable(Exception):
    """Placeholder until the images work lands."""
