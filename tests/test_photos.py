"""photos.load: real files of every kind a phone or a user makes -> 224x224 RGB as seen."""

import os
import pickle

import cv2
import numpy as np
import pytest
import pillow_heif
from PIL import Image

from daemon.data import images, photos

pillow_heif.register_heif_opener()  # to write HEIC here; photos reads it without this
from daemon.data.images import BadImage

SIZE = photos.SIZE
# What a viewer shows of stored pixels `a` tagged with each EXIF Orientation (EXIF 2.32).
SHOWN = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
         4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
         6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
         8: lambda a: np.rot90(a, 1)}


def scene(height=480, width=640):
    """Smooth, asymmetric, colourful RGB: every orientation and channel order looks different."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.dstack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37 + y / 53)])
    rgb[height // 8: height // 3, width // 10: width // 4] = (250, 30, 30)  # top left: red
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write(path, rgb, fmt, orientation=None, **options):
    exif = Image.Exif()
    if orientation is not None:
        exif[274] = orientation
    Image.fromarray(rgb).save(path, format=fmt, exif=exif.tobytes(), **options)
    return str(path)


def difference(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_rotated_jpeg_is_seen_as_the_rotated_pixels(tmp_path, orientation):
    stored = scene()
    tagged = write(tmp_path / "tagged.jpg", stored, "JPEG", orientation, quality=95)
    upright = write(tmp_path / "upright.jpg", np.ascontiguousarray(SHOWN[orientation](stored)),
                    "JPEG", quality=95)
    result, expected = photos.load(tagged), photos.load(upright)
    assert result.shape == (SIZE, SIZE, 3) and result.dtype == np.uint8
    assert difference(result, expected) < 2.0
    if orientation != 1:  # and the tag did change what is seen
        assert difference(photos.load(write(tmp_path / "plain.jpg", stored, "JPEG")),
                          expected) > 10


def test_exif_orientation_tables_agree_with_pillow():
    stored = scene(24, 40)
    for orientation, shown in SHOWN.items():
        image = Image.fromarray(stored)
        exif = image.getexif()
        exif[274] = orientation
        image.info["exif"] = exif.tobytes()
        from PIL import ImageOps
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(image)), shown(stored))


@pytest.fixture
def decodes(monkeypatch):
    """The cv2.imdecode flags photos asks for, in order."""
    flags = []
    real = images._imdecode

    def spy(data, flag):
        flags.append(flag)
        return real(data, flag)

    monkeypatch.setattr(images, "_imdecode", spy)
    return flags


def jpeg_bytes(height, width, quality=90):
    return cv2.imencode(".jpg", cv2.resize(scene()[:, :, ::-1], (width, height)),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def test_a_large_jpeg_is_decoded_at_one_eighth(tmp_path, decodes):
    data = jpeg_bytes(3000, 4000)
    (tmp_path / "big.jpg").write_bytes(data)
    result = photos.load(str(tmp_path / "big.jpg"))
    assert decodes == [cv2.IMREAD_REDUCED_COLOR_8]
    eighth = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
    assert eighth.shape == (375, 500, 3)
    np.testing.assert_array_equal(result, photos.fit(eighth[:, :, ::-1]))


@pytest.mark.parametrize("height, reduction", [
    (300, 1), (446, 1), (447, 2), (892, 2), (893, 4), (1500, 4), (1784, 4), (1785, 8),
    (3000, 8)])
def test_the_coarsest_reduction_that_keeps_the_short_side(decodes, height, reduction):
    data = jpeg_bytes(height, height + 500)
    decoded = photos.decode(data)
    assert decodes == [photos.JPEG_COLOUR[reduction]]  # one decode, from the frame header
    assert min(decoded.shape[:2]) >= SIZE
    assert min(decoded.shape[:2]) == -(-height // reduction)  # as libjpeg rounds


def test_a_small_jpeg_is_decoded_whole(tmp_path, decodes):
    data = jpeg_bytes(300, 300)
    assert photos.decode(data).shape == (300, 300, 3)
    assert decodes[-1] == cv2.IMREAD_COLOR


def test_a_progressive_jpeg_with_a_thumbnail_is_read_and_truncated_ones_are_bad(tmp_path):
    data = cv2.imencode(".jpg", scene()[:, :, ::-1], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    data = data.tobytes()
    thumbnail = jpeg_bytes(48, 64)  # inside an APP1 segment, with its own end marker
    app1 = b"\xff\xe1" + (len(thumbnail) + 8).to_bytes(2, "big") + b"Exif\0\0" + thumbnail
    with_thumbnail = data[:2] + app1 + data[2:]
    for name, content in {"progressive.jpg": data, "thumbnail.jpg": with_thumbnail,
                          "motion.jpg": data + b"\x00\x00\x00\x18ftypmp42" + os.urandom(5000)
                          }.items():
        (tmp_path / name).write_bytes(content)
        assert difference(photos.load(str(tmp_path / name)), photos.fit(scene())) < 3, name
    for cut in (len(with_thumbnail) // 2, len(with_thumbnail) - 2, 400):
        (tmp_path / "cut.jpg").write_bytes(with_thumbnail[:cut])
        with pytest.raises(BadImage, match="truncated JPEG"):
            photos.load(str(tmp_path / "cut.jpg"))


def test_heic_round_trip_keeps_colour_and_applies_its_orientation_once(tmp_path):
    stored = scene()
    plain = write(tmp_path / "plain.heic", stored, "HEIF", quality=95)
    assert difference(photos.load(plain), photos.fit(stored)) < 3
    tagged = write(tmp_path / "tagged.heic", stored, "HEIF", 6, quality=95)
    assert b"irot" in open(tagged, "rb").read()  # pillow-heif writes the tag as HEIF's irot
    shown = np.ascontiguousarray(SHOWN[6](stored))
    assert photos.decode(open(tagged, "rb").read()).shape == shown.shape
    assert difference(photos.load(tagged), photos.fit(shown)) < 3
    assert difference(photos.load(tagged), photos.fit(np.rot90(shown, 2))) > 20  # not twice


def test_avif_round_trip_keeps_colour_and_applies_its_orientation_once(tmp_path):
    stored = scene()
    tagged = write(tmp_path / "tagged.avif", stored, "AVIF", 8, quality=95,
                   subsampling="4:4:4")
    shown = np.ascontiguousarray(SHOWN[8](stored))
    assert photos.decode(open(tagged, "rb").read()).shape == shown.shape
    assert difference(photos.load(tagged), photos.fit(shown)) < 3
    assert difference(photos.load(tagged), photos.fit(np.rot90(shown, 2))) > 20


def test_formats_are_known_by_content_not_by_name(tmp_path):
    stored = scene()
    heic_as_jpg = write(tmp_path / "really-heic.jpg", stored, "HEIF", quality=95)
    jpg_as_heic = write(tmp_path / "really-jpeg.heic", stored, "JPEG", quality=95)
    avif_as_png = write(tmp_path / "really-avif.png", stored, "AVIF", quality=95,
                        subsampling="4:4:4")
    for path in (heic_as_jpg, jpg_as_heic, avif_as_png):
        assert difference(photos.load(path), photos.fit(stored)) < 3, path
    assert images.container_format(open(heic_as_jpg, "rb").read()) == "HEIF"
    assert images.container_format(open(avif_as_png, "rb").read()) == "AVIF"
    # an AVIF whose major brand is HEIF's generic "mif1" is still an AVIF
    data = bytearray(open(avif_as_png, "rb").read())
    data[8:12] = b"mif1"
    assert images.container_format(bytes(data)) == "AVIF"


def test_gray_rgba_and_16_bit_pngs(tmp_path):
    gray = cv2.cvtColor(scene(), cv2.COLOR_RGB2GRAY)
    assert cv2.imwrite(str(tmp_path / "gray.png"), gray)
    result = photos.load(str(tmp_path / "gray.png"))
    assert result.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(result[:, :, 0], result[:, :, 2])
    assert difference(result[:, :, 0], photos.fit(gray[:, :, None].repeat(3, 2))[:, :, 0]) < 1

    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[:, :150] = (0, 0, 255, 255)  # BGRA: opaque red on the left, transparent on the right
    assert cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    result = photos.load(str(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(result[SIZE // 2, 10], (255, 0, 0))
    np.testing.assert_array_equal(result[SIZE // 2, -10], (255, 255, 255))  # over white

    deep = (scene()[:, :, ::-1].astype(np.uint16) * 257)
    assert cv2.imwrite(str(tmp_path / "deep.png"), deep)
    result = photos.load(str(tmp_path / "deep.png"))
    assert result.dtype == np.uint8
    assert difference(result, photos.fit(scene())) < 1


def test_tiny_and_panorama_images(tmp_path):
    tiny = np.full((10, 10, 3), (20, 200, 90), np.uint8)
    assert cv2.imwrite(str(tmp_path / "tiny.png"), tiny[:, :, ::-1])
    result = photos.load(str(tmp_path / "tiny.png"))
    assert result.shape == (SIZE, SIZE, 3)
    assert (result == (20, 200, 90)).all()

    panorama = np.zeros((100, 5000, 3), np.uint8)
    panorama[:, :2450] = (255, 0, 0)
    panorama[:, 2450:2550] = (0, 255, 0)  # its centred square
    panorama[:, 2550:] = (0, 0, 255)
    assert cv2.imwrite(str(tmp_path / "panorama.png"), panorama[:, :, ::-1])
    result = photos.load(str(tmp_path / "panorama.png"))
    assert result.shape == (SIZE, SIZE, 3)
    assert difference(result[:, 4:-4], np.full((SIZE, SIZE - 8, 3), (0, 255, 0), np.uint8)) < 1


def ispe_patched(data, width, height):
    """A HEIF/AVIF whose image spatial extents (ispe boxes) claim width x height."""
    data, at = bytearray(data), 0
    while (at := data.find(b"ispe", at)) >= 0:
        data[at + 8: at + 16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        at += 4
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("side", [7000, 10_000])  # over the cap; over twice it (Pillow's own)
def test_a_phone_format_claiming_huge_dimensions_is_refused_before_decoding(
        tmp_path, fmt, side):
    small = write(tmp_path / "small", scene(64, 64), fmt)
    (tmp_path / "huge").write_bytes(ispe_patched(open(small, "rb").read(), side, side))
    with pytest.raises(BadImage, match="image too large"):
        photos.load(str(tmp_path / "huge"))
    with pytest.raises(BadImage, match="image too large"):
        images.load(str(tmp_path / "huge"))


@pytest.mark.parametrize("name, content, message", [
    ("text.heic", b"these are not the pixels you are looking for\n" * 10,
     "not a decodable image"),
    ("ftyp-only.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "cannot decode HEIF"),
])
def test_files_that_are_not_phone_photos_are_bad(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadImage, match=message):
        photos.load(str(tmp_path / name))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_truncated_phone_formats_are_bad(tmp_path, fmt):
    data = open(write(tmp_path / "whole", scene(), fmt, quality=95), "rb").read()
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut").write_bytes(data[:cut])
        with pytest.raises(BadImage, match=f"cannot decode {fmt}") as caught:
            photos.load(str(tmp_path / "cut"))
        assert pickle.loads(pickle.dumps(caught.value)).args == caught.value.args


def test_symlinks_and_fifos_are_still_refused(tmp_path):
    target = write(tmp_path / "photo.jpg", scene(), "JPEG")
    os.symlink(target, tmp_path / "link.jpg")
    with pytest.raises(BadImage, match="symbolic link"):
        photos.load(str(tmp_path / "link.jpg"))
    os.mkfifo(tmp_path / "fifo.jpg")  # no writer: must not block
    with pytest.raises(BadImage, match="not a regular file"):
        photos.load(str(tmp_path / "fifo.jpg"))


def test_load_for_training_names_the_bytes_it_read(tmp_path):
    import hashlib

    path = write(tmp_path / "photo.heic", scene(), "HEIF")
    pixels, digest, info = photos.load_for_training(path)
    np.testing.assert_array_equal(pixels, photos.load(path))
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert info.st_size == os.path.getsize(path)


def test_the_old_28x28_path_reads_heic_and_avif_too(tmp_path):
    """classify with the mlp model: a product photo as HEIC gives the crop its PNG gives."""
    photo = np.full((280, 200, 3), 255, np.uint8)
    cv2.ellipse(photo, (100, 140), (60, 110), 0, 0, 360, (40, 60, 160), -1)
    png = str(tmp_path / "photo.png")
    assert cv2.imwrite(png, photo[:, :, ::-1])
    reference = images.load(png)
    for fmt, options in (("HEIF", {}), ("AVIF", {"subsampling": "4:4:4"})):
        path = write(tmp_path / f"photo.{fmt.lower()}", photo, fmt, quality=95, **options)
        result = images.load(path)
        assert result.shape == (28, 28) and result.dtype == np.uint8
        assert difference(result, reference) < 4, fmt
        assert result.max() > 200  # an object, not an empty canvas


def test_phone_formats_are_watched_by_default():
    from daemon.service import config

    assert {"heic", "heif", "avif"} <= set(config.DEFAULT_EXTENSIONS)


def test_a_worker_process_loads_photos_without_tensorflow(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    path = write(tmp_path / "photo.heic", scene(), "HEIF")
    code = ("import sys; from daemon.data import photos; x = photos.load(sys.argv[1]); "
            "print(x.shape, sorted({'tensorflow', 'keras'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.stdout.strip() == "(224, 224, 3) []", result.stderr
