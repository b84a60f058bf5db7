"""Decoding and Fashion-MNIST-style preprocessing of real image files, good and bad."""

import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import pytest

from conftest import REPO
from daemon.data import dataset, images
from daemon.data.images import BadImage, Unreadable


@pytest.fixture(scope="module")
def crops():
    sample = dataset.load("sample")
    return sample.x_test[:20], sample.y_test[:20]


def as_photo(crop, scale=12, pad=(40, 90, 25, 60), colour=(40, 90, 200)):
    """A 28x28 crop as a product photo: dark object on white, larger, off-centre, colour."""
    object_ = cv2.resize(255 - crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    top, bottom, left, right = pad
    gray = cv2.copyMakeBorder(object_, top, bottom, left, right, cv2.BORDER_CONSTANT, value=255)
    tint = np.array(colour, np.float32) / 255.0
    return (gray[:, :, None] * (0.5 + 0.5 * tint)).astype(np.uint8) + np.uint8(0)


def similarity(a, b):
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def test_a_dataset_crop_is_used_as_is(tmp_path, crops):
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), crops[0][0])
    np.testing.assert_array_equal(images.load(str(path)), crops[0][0])


@pytest.mark.parametrize("extension", ["png", "jpg", "bmp", "tiff", "webp"])
def test_a_product_photo_becomes_its_crop_again(tmp_path, crops, extension):
    path = str(tmp_path / f"photo.{extension}")
    for crop in crops[0][:5]:
        assert cv2.imwrite(path, as_photo(crop))
        result = images.load(path)
        assert result.shape == (28, 28) and result.dtype == np.uint8
        assert similarity(result, crop) > 0.85


def test_alpha_16_bit_and_gray_variants(tmp_path, crops):
    crop = crops[0][1]
    photo = cv2.cvtColor(as_photo(crop), cv2.COLOR_BGR2GRAY)
    rgba = np.dstack([np.zeros_like(photo)] * 3 + [255 - photo])  # black ink, alpha = shape
    variants = {"rgba.png": rgba, "gray16.png": photo.astype(np.uint16) * 257,
                "gray.tif": photo}
    for name, pixels in variants.items():
        path = str(tmp_path / name)
        assert cv2.imwrite(path, pixels)
        assert similarity(images.load(path), crop) > 0.85, name


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width, height):
    """A valid PNG signature and IHDR claiming width x height, with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)))


BAD = {
    "empty.png": (b"", "empty file"),
    "garbage.jpg": (b"this is not an image at all" * 10, "not a decodable image"),
    "truncated.png": (None, "not a decodable image"),
    "bomb.png": (png_header_only(60000, 60000), "image too large: over 40000000 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_bad_image_with_the_reason(tmp_path, crops, name):
    data, reason = BAD[name]
    if data is None:
        ok, encoded = cv2.imencode(".png", as_photo(crops[0][2]))
        data = encoded.tobytes()[: len(encoded) // 2]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(BadImage, match=reason):
        images.load(str(path))


def test_directories_fifos_symlinks_and_huge_files_are_refused(tmp_path, crops):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(BadImage, match="a directory"):
        images.load(str(tmp_path / "folder.png"))
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(BadImage, match="not a regular file"):
        images.load(str(tmp_path / "pipe.png"))  # and it does not block
    cv2.imwrite(str(tmp_path / "real.png"), crops[0][0])
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    with pytest.raises(BadImage, match="symbolic link"):
        images.load(str(tmp_path / "link.png"))
    with open(tmp_path / "huge.png", "wb") as file:
        file.truncate(images.MAX_FILE_BYTES + 1)
    with pytest.raises(BadImage, match="file too large"):
        images.load(str(tmp_path / "huge.png"))


# --- Images as seen: the EXIF Orientation tag -------------------------------------------

def exif_tiff(orientation):
    """A big-endian TIFF structure with one IFD entry: Orientation (0x0112, SHORT)."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\0" * 4


def with_orientation(encoded, orientation):
    """JPEG, PNG or WebP bytes with an EXIF Orientation tag added (cv2 cannot write one)."""
    tiff = exif_tiff(orientation)
    if encoded.startswith(b"\xff\xd8"):  # JPEG: an APP1 "Exif" segment right after SOI
        payload = b"Exif\0\0" + tiff
        return encoded[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + \
            encoded[2:]
    if encoded.startswith(b"\x89PNG"):  # PNG: an eXIf chunk before the image data
        at = encoded.index(b"IDAT") - 4
        return encoded[:at] + png_chunk(b"eXIf", tiff) + encoded[at:]
    assert encoded[8:12] == b"WEBP"  # WebP: the extended format (VP8X) with an EXIF chunk
    height, width = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + \
        (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + encoded[12:] + b"EXIF" + struct.pack("<I", len(tiff)) + tiff
    return b"RIFF" + struct.pack("<I", len(body)) + body


# How to store an upright image so that the tag turns it back (EXIF 2.3, table 4.6.4).
STORED = {3: lambda image: cv2.rotate(image, cv2.ROTATE_180),
          6: lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
          8: lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)}


def rgba16(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    return np.dstack([np.zeros_like(gray)] * 3 + [65535 - gray])  # black ink, alpha = shape


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("kind", ["jpg", "png", "webp", "rgba16.png"])
def test_a_sideways_photo_with_an_orientation_tag_is_seen_upright(tmp_path, crops, kind,
                                                                 orientation):
    upright = as_photo(crops[0][7], pad=(30, 200, 20, 60))  # tall, off-centre: turning shows
    if kind == "rgba16.png":
        upright = rgba16(upright)
    extension = "." + kind.split(".")[-1]
    lossless = [cv2.IMWRITE_WEBP_QUALITY, 101] if kind == "webp" else []
    (tmp_path / f"upright{extension}").write_bytes(cv2.imencode(extension, upright)[1].tobytes())
    stored = cv2.imencode(extension, STORED[orientation](upright), lossless)[1].tobytes()
    (tmp_path / f"untagged{extension}").write_bytes(stored)
    (tmp_path / f"tagged{extension}").write_bytes(with_orientation(stored, orientation))
    seen, untagged, tagged = (images.load(str(tmp_path / f"{name}{extension}")).astype(int)
                              for name in ("upright", "untagged", "tagged"))
    assert np.abs(tagged - seen).mean() < 2.0  # JPEG blocks fall elsewhere once turned
    assert np.abs(untagged - seen).mean() > 10.0  # the tag made the difference
    assert similarity(tagged, crops[0][7]) > 0.85


# --- The pixel cap ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A real, complete 20000x20000 8-bit gray PNG of about 400 KB (400 megapixels)."""
    width = height = 20000
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + a black row
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))
    return path


def test_a_400_megapixel_png_is_refused(bomb):
    with pytest.raises(BadImage, match="image too large: over 40000000 pixels"):
        images.load(str(bomb))


PEAK_AFTER_TENSORFLOW = """
import sys
import tensorflow  # loads cv2 before daemon does
from daemon.data import images
try:
    images.load(sys.argv[1])
except images.BadImage as error:
    print("BadImage:", error)
print("VmHWM", [line.split()[1] for line in open("/proc/self/status")
                if line.startswith("VmHWM")][0])
"""


def run_python(code, *args, env=None):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env=env)


def test_the_cap_holds_when_tensorflow_loads_opencv_first(bomb):
    """Worker and daemon processes inherit the variable that importing `daemon` set."""
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(images.MAX_PIXELS)
    result = run_python(PEAK_AFTER_TENSORFLOW, str(bomb))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BadImage: image too large" in result.stdout
    peak_kb = int(result.stdout.split("VmHWM")[1].strip(" '[]\n"))
    assert peak_kb < 1_500_000, result.stdout  # TensorFlow alone is ~0.6 GB; the image 4 GB


def test_without_the_cap_images_refuses_to_work(bomb):
    """A process that loads OpenCV before `daemon` cannot have the cap: it must not decode
    silently without it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    result = run_python(PEAK_AFTER_TENSORFLOW, str(bomb), env=env)
    assert result.returncode != 0
    assert "OpenCV's pixel cap is not 40000000" in result.stderr
    assert "VmHWM" not in result.stdout


# --- Transient errors ---------------------------------------------------------------------

def load_as_nobody(path):
    """images.load(path) in a forked child running as uid/gid 65534: (kind, message)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                images.load(path)
                outcome = "ok:"
            except Exception as error:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(error).__name__}:{error}"
            os.write(writer, outcome.encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return tuple(outcome.split(":", 1))


def test_permission_denied_is_unreadable_and_goes_away_once_fixed(crops):
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)  # reachable by anyone: only the file's own mode denies
        path = os.path.join(folder, "locked.png")
        cv2.imwrite(path, as_photo(crops[0][0]))
        os.chmod(path, 0o000)
        assert load_as_nobody(path) == ("Unreadable", "cannot open: Permission denied")
        os.chmod(path, 0o644)  # the permission fixed later
        assert load_as_nobody(path) == ("ok", "")
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def test_a_vanished_file_is_unreadable_not_bad(tmp_path):
    with pytest.raises(Unreadable, match="cannot open: No such file or directory"):
        images.load(str(tmp_path / "gone.png"))


def test_load_runs_in_worker_processes_and_its_errors_come_back(tmp_path, crops):
    for error in (BadImage("empty file"), Unreadable("cannot open: Permission denied")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    good, empty = tmp_path / "good.png", tmp_path / "empty.png"
    cv2.imwrite(str(good), crops[0][0])
    empty.write_bytes(b"")
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        np.testing.assert_array_equal(pool.submit(images.load, str(good)).result(), crops[0][0])
        with pytest.raises(BadImage, match="empty file"):
            pool.submit(images.load, str(empty)).result()
        with pytest.raises(Unreadable, match="No such file"):
            pool.submit(images.load, str(tmp_path / "gone.png")).result()


# --- Reduced JPEG decoding ----------------------------------------------------------------

def phone_photo(crop, object_side, size=(3024, 4032), noise=2.0, seed=0):
    """A 12 MP landscape phone photo: the crop, dark on a light grey, `object_side` pixels
    tall, off-centre, with sensor noise."""
    object_ = cv2.resize(255 - crop, (object_side, object_side), interpolation=cv2.INTER_CUBIC)
    photo = np.full(size, 232, np.uint8)
    top, left = (size[0] - object_side) // 3, (size[1] - object_side) // 4
    photo[top: top + object_side, left: left + object_side] = np.minimum(232, object_)
    noisy = photo + np.random.default_rng(seed).normal(0, noise, size)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("object_side, decoded_shape", [(2400, (378, 504)),   # at /8
                                                         (300, (1512, 2016))])  # at /2
def test_reduced_jpeg_decoding_matches_the_full_decode(tmp_path, crops, object_side,
                                                       decoded_shape):
    for index in range(5):
        photo = phone_photo(crops[0][index], object_side, seed=index)
        data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        assert images.decode(data).shape == decoded_shape
        path = tmp_path / f"photo-{index}.jpg"
        path.write_bytes(data)
        reduced = images.load(str(path)).astype(int)
        full = images.to_dataset_style(cv2.imdecode(np.frombuffer(data, np.uint8),
                                                    cv2.IMREAD_GRAYSCALE)).astype(int)
        assert np.abs(reduced - full).mean() < 3.0, index
        assert similarity(reduced, crops[0][index]) > 0.85, index
