"""A real daemon labels phone photos as seen and refuses a decompression bomb in bounded memory."""

import shutil

import cv2
import pytest

from conftest import sidecar, wait_until, write_config
from daemon.data import dataset
from test_images import STORED, bomb, phone_photo, with_orientation  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def crops():
    sample = dataset.load("sample")
    return sample.x_test[:8]


@pytest.fixture
def trained(tmp_path, small_data, one_epoch_save):
    """A config whose training is already complete, so the daemon only labels."""
    shutil.copytree(one_epoch_save, tmp_path / "save")
    return write_config(tmp_path, small_data, epochs=1)


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


def test_phone_photos_are_labelled_as_seen_and_a_bomb_is_refused(tmp_path, trained, daemons,
                                                                 crops, bomb):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    expected = {}
    for index, crop in enumerate(crops):
        photo = phone_photo(crop, 2400, seed=index)  # 12 MP, decoded at /8
        upright = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        orientation = (6, 8, 3)[index % 3]
        stored = cv2.imencode(".jpg", STORED[orientation](photo))[1].tobytes()
        (inbox / f"{index}-upright.jpg").write_bytes(upright)
        (inbox / f"{index}-sideways.jpg").write_bytes(with_orientation(stored, orientation))
        (inbox / f"{index}-full.png").write_bytes(cv2.imencode(".png", photo)[1].tobytes())
        expected[index] = ["upright.jpg", "sideways.jpg", "full.png"]
    shutil.copy(bomb, inbox / "bomb.png")
    daemon = daemons(trained)
    pid = daemon.pid
    names = [f"{i}-{kind}" for i, kinds in expected.items() for kind in kinds] + ["bomb.png"]
    wait_until(lambda: all(sidecar(inbox / name) for name in names), 120,
               message="a sidecar for every photo and the bomb")
    assert peak_rss_kb(pid) < 2_500_000  # decoding the bomb would take 4 GB
    assert daemon.stop() == 0, daemon.log
    assert "image too large" in sidecar(inbox / "bomb.png")["error"]
    for index, kinds in expected.items():
        labels = [sidecar(inbox / f"{index}-{kind}")["label"] for kind in kinds]
        # turned as the tag says; decoded reduced as a JPEG, the same as in full as a PNG
        assert labels == [labels[0]] * 3, (index, labels)
