"""Decode any image OpenCV reads (and phones' HEIC and AVIF, through Pillow) and make it look
like a Fashion-MNIST example.

Fashion-MNIST was made from product photos on light backgrounds by trimming the background,
resizing the longest edge to 28, centring on a 28x28 canvas, negating (light object on
dark) and converting to 8-bit gray (its README). We do the same, so a photo gets the label
a dataset crop would. An image that already is a 28x28 light-on-dark crop is used as is.
Images are taken as seen, not as stored: the EXIF Orientation tag of a phone photo applies.
"""

import errno
import functools
import hashlib
import io
import logging
import math
import os
import stat
import struct
import zlib

import cv2
import numpy as np

from daemon import MAX_IMAGE_PIXELS as MAX_PIXELS  # sets OpenCV's cap before cv2 loads
from daemon.errors import WardrobeError
from daemon.service import logs

log = logging.getLogger("daemon.images")  # the name users see: daemon.service.logs

MAX_FILE_BYTES = 64 * 1024 * 1024
SIDE = 28
BACKGROUND_TOLERANCE = 0.05 * 255  # the dataset's trimming threshold: 5% of full intensity
# Images are trimmed and resized at 1/8, 1/4 or 1/2 of their size (a JPEG is decoded so:
# libjpeg scales in the DCT, several times faster) unless their object would then be under 4x
# the 28-pixel target: from there on, area resizing to 28 averages at least 4x4 pixels per
# output pixel and a finer scale changes the result little.
MIN_OBJECT_EDGE = 4 * SIDE
# A larger trimmed object is first shrunk to this, so the float arithmetic stays small.
WORK_EDGE = 8 * SIDE
STRIP_PIXELS = 1 << 20  # colour, alpha and deep images become gray a strip of rows at a time

# As stored (depth, alpha) but turned as the EXIF Orientation tag says: OpenCV applies the
# tag (JPEG, PNG eXIf, WebP, TIFF) for every flag except IMREAD_UNCHANGED, and with these
# three together it keeps the stored type.
AS_SEEN = cv2.IMREAD_COLOR | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH
JPEG_GRAY = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
             4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
# Phones' formats, read through Pillow (OpenCV reads no HEIF, and AVIF without its rotation),
# known by the brands in their `ftyp` box, not by their names.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
# Kinds of file and failures that are verdicts; any other OSError can go away by itself.
FINAL_ERRNOS = {errno.ELOOP: "symbolic link: not followed",
                errno.EISDIR: "a directory, not an image file"}

cv2.setNumThreads(1)  # many small images: threads cost more than they save


class BadImage(Exception):
    """The file cannot be labelled, whatever happens later; the message says why (it goes in
    the error sidecar)."""


class Unreadable(Exception):
    """The file cannot be read now, for a reason that may go away by itself (permissions,
    I/O errors, the file vanishing or changing while read): try again later."""


def load(path):
    """A file -> 28x28 uint8, ready for the model (after /255). Raises BadImage or
    Unreadable. A plain function with picklable exceptions: runs in worker processes.
    The one preprocessing of the daemon: inbox images and training images alike."""
    return to_dataset_style(_decode(read_file(path), path))


def load_for_training(path):
    """load(), plus what a data version records of the file: (28x28, sha256 of the bytes
    read, os.stat_result of the file as read)."""
    data, info = read_file(path, with_info=True)
    return to_dataset_style(_decode(data, path)), hashlib.sha256(data).hexdigest(), info


def _decode(data, path):
    # libpng writes its warnings and errors (an sRGB profile it dislikes, a truncated file)
    # to fd 2 itself: logged at DEBUG, the file being labelled or refused all the same
    with logs.captured(log, logging.DEBUG, f"{path}: "):
        return decode(data)


def read_file(path, with_info=False):
    """The bytes of a regular file, never following a symlink and never blocking on a FIFO;
    with `with_info`, (bytes, its fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _classified(error, "cannot open") from None
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
        after = os.fstat(fd)
        if remaining or (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
            raise Unreadable("the file changed while being read")
        return (b"".join(chunks), info) if with_info else b"".join(chunks)
    except OSError as error:
        raise _classified(error, "cannot read") from None
    finally:
        os.close(fd)


def decode(data):
    """Bytes -> 2-D uint8 gray image as seen, at the coarsest scale (1/8, 1/4, 1/2 or 1) that
    leaves its trimmed object MIN_OBJECT_EDGE pixels long. Coarse is fast (a JPEG is
    decoded reduced) and averages away the sensor noise that would defeat the trimming."""
    if data.startswith(b"\xff\xd8\xff"):
        return _at_object_scale(lambda reduction: _imdecode(data, JPEG_GRAY[reduction]))
    full = decode_full(data)
    return _at_object_scale(lambda reduction: _shrunk(full, reduction))


def decode_full(data):
    """Bytes -> 2-D uint8 gray image as seen, full size; alpha is composited over white (a
    product photo's background), 16-bit and float images are scaled to 8 bits."""
    image = decode_as_seen(data)
    if image.ndim == 2 and image.dtype == np.uint8:
        return image  # already 8-bit gray: the common case, kept cheap
    return to_8bit(image)


def decode_as_seen(data):
    """Bytes -> the image as seen (EXIF orientation, or HEIF's rotation and mirroring,
    applied), as stored otherwise: 8/16-bit or float, gray (2-D), BGR or BGRA as OpenCV
    gives them. HEIF/HEIC and AVIF (phones' formats, known by their `ftyp` brands) through
    Pillow, everything else through OpenCV."""
    kind = container_format(data)
    return _imdecode(data, AS_SEEN) if kind is None else _pillow_decode(data, kind)


def to_8bit(image, colour=False):
    """A decoded image -> uint8 gray (2-D) or, with `colour`, BGR: alpha composited over
    white (a product photo's background), 16-bit and float scaled to 8 bits, a strip of rows
    at a time (a float copy of a whole 40-megapixel image would take 640 MB)."""
    offset, scale = _unit_scale(image)
    out = np.empty(image.shape[:2] + ((3,) if colour else ()), np.uint8)
    rows = max(1, STRIP_PIXELS // image.shape[1])
    for top in range(0, image.shape[0], rows):
        out[top: top + rows] = _strip_8bit(image[top: top + rows], offset, scale, colour)
    return out


def container_format(data):
    """"HEIF" or "AVIF" for an ISO base media file of one by its `ftyp` box's major and
    compatible brands (an AVIF may name "mif1", HEIF's, beside "avif"), else None."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    brands = {data[8:12]} | {data[i: i + 4] for i in range(16, end - 3, 4)}
    if brands & AVIF_BRANDS:
        return "AVIF"
    return "HEIF" if brands & HEIF_BRANDS else None


def to_dataset_style(gray):
    """A 2-D uint8 image -> 28x28 uint8, light object on a dark background."""
    background = _background(gray)
    if gray.shape == (SIDE, SIDE) and background < 128:
        return gray  # already a dataset-style crop
    gray = _trim(gray, background)
    height, width = gray.shape
    if max(height, width) > WORK_EDGE:
        scale = WORK_EDGE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
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


def _classified(error, doing):
    if error.errno in FINAL_ERRNOS:
        return BadImage(FINAL_ERRNOS[error.errno])
    return Unreadable(f"{doing}: {error.strerror or error}")


def _at_object_scale(image_at):
    """`image_at(reduction)` at the coarsest reduction that leaves the object long enough."""
    reduction, gray = 8, image_at(8)
    edge = max(_trim(gray, _background(gray)).shape)
    finer = reduction
    while finer > 1 and edge * reduction < MIN_OBJECT_EDGE * finer:
        finer //= 2
    return gray if finer == reduction else image_at(finer)


def _shrunk(gray, reduction):
    """As the JPEG decoder's reduced sizes: each side divided and rounded up, area-averaged."""
    if reduction == 1:
        return gray
    height, width = gray.shape
    size = (-(-width // reduction), -(-height // reduction))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _imdecode(data, flags):
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as error:
        if "MAX_IMAGE" in str(error):
            raise BadImage(f"image too large: over {MAX_PIXELS} pixels") from None
        if "Insufficient memory" in str(error) or "Failed to allocate" in str(error):
            raise Unreadable("out of memory while decoding") from None
        raise BadImage(f"cannot decode: {str(error).strip().splitlines()[-1][:200]}") from None
    if image is None or image.size == 0:
        raise BadImage("not a decodable image")
    return image


def _background(gray):
    corners = sorted(int(v) for v in (gray[0, 0], gray[0, -1], gray[-1, 0], gray[-1, -1]))
    return (corners[1] + corners[2]) / 2  # their median


def _trim(gray, background):
    """`gray` without its edges close to the background colour (a view). A 3x3 median first,
    so that no lone noisy pixel of a photo's background counts as the object."""
    low = max(0, math.ceil(background - BACKGROUND_TOLERANCE))
    high = min(255, math.floor(background + BACKGROUND_TOLERANCE))
    foreground = cv2.bitwise_not(cv2.inRange(cv2.medianBlur(gray, 3), low, high))
    left, top, width, height = cv2.boundingRect(foreground)
    return gray[top: top + height, left: left + width] if width and height else gray


def _unit_scale(image):
    """(offset, scale) that map the image's values onto 0..1."""
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return float(info.min), 1.0 / (float(info.max) - info.min)
    if np.issubdtype(image.dtype, np.floating):
        top = float(np.nanmax(image))
        return 0.0, (1.0 / top if 1.0 < top < math.inf else 1.0)
    raise BadImage(f"unsupported pixel type {image.dtype}")


def _strip_8bit(strip, offset, scale, colour):
    unit = np.clip(np.nan_to_num((strip.astype(np.float32) - offset) * scale), 0.0, 1.0)
    if unit.ndim == 3 and unit.shape[2] == 4:
        alpha = unit[:, :, 3:4]
        unit = unit[:, :, :3] * alpha + (1.0 - alpha)
    elif unit.ndim == 3 and unit.shape[2] == 2:  # gray + alpha
        alpha = unit[:, :, 1]
        unit = unit[:, :, 0] * alpha + (1.0 - alpha)
    if colour and unit.ndim == 2:
        unit = cv2.cvtColor(unit, cv2.COLOR_GRAY2BGR)
    elif colour and unit.shape[2] != 3:
        unit = np.repeat(unit[:, :, :1], 3, axis=2)
    elif not colour and unit.ndim == 3 and unit.shape[2] == 3:
        unit = cv2.cvtColor(unit, cv2.COLOR_BGR2GRAY)
    elif not colour and unit.ndim == 3:
        unit = unit[:, :, 0]
    return np.rint(unit * 255.0)


@functools.cache
def pillow():
    """Pillow, with the HEIF opener of pillow-heif registered (AVIF is Pillow's own) and the
    daemon's pixel cap; imported at the first phone-format image, not at every start."""
    from PIL import Image, ImageOps
    import pillow_heif

    pillow_heif.register_heif_opener(thumbnails=False)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns above, refuses above twice that
    return Image, ImageOps


def _pillow_decode(data, kind):
    """A HEIF or AVIF file -> as `decode_as_seen`. Its size is checked before its pixels are
    decoded. libheif applies HEIF's irot/imir itself and pillow-heif then resets the EXIF
    Orientation to 1; Pillow's AVIF turns irot/imir into an EXIF Orientation instead: so
    exif_transpose turns each exactly once."""
    Image, ImageOps = pillow()
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadImage(f"image too large: over {MAX_PIXELS} pixels")
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            pixels = np.asarray(image)
    except Image.DecompressionBombError:
        raise BadImage(f"image too large: over {MAX_PIXELS} pixels") from None
    except MemoryError:
        raise Unreadable("out of memory while decoding") from None
    except (OSError, ValueError, RuntimeError, SyntaxError, EOFError, struct.error) as error:
        # the bytes are in memory: no OSError here is the file system's
        message = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(
            error).__name__
        raise BadImage(f"cannot decode {kind}: {message}") from None
    if pixels.size == 0:
        raise BadImage("not a decodable image")
    channels = pixels.shape[2] if pixels.ndim == 3 else 0
    code = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}.get(channels)
    return cv2.cvtColor(pixels, code) if code is not None else np.ascontiguousarray(pixels)


def _png_header(width, height):
    """A valid PNG signature and IHDR claiming width x height, with a tiny body."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _check_pixel_cap():
    """OpenCV reads its cap once, when loaded: if anything loaded it before `daemon` set the
    cap, a 90 KB file could make it allocate gigabytes. Refuse to run rather than do that."""
    side = math.isqrt(MAX_PIXELS) + 1
    try:
        cv2.imdecode(np.frombuffer(_png_header(side, side), np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as error:
        if "MAX_IMAGE" in str(error):
            return
    raise WardrobeError(
        f"OpenCV's pixel cap is not {MAX_PIXELS}: cv2 was loaded (e.g. by TensorFlow or Keras) "
        f"before the daemon package set OPENCV_IO_MAX_IMAGE_PIXELS; import daemon first")


_check_pixel_cap()
