"""Decoding and Fashion-MNIST-style preprocessing of real image files, good and bad."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from daemon import dataset, images
from daemon.images import BadImage


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


def png_header_only(width, height):
    """A valid PNG signature and IHDR claiming width x height, with a tiny body."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


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
