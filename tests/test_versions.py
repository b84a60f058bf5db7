"""The pieces under the folder source, in process: listing a folder, data versions, the
best-checkpoint contest, widening the head."""

import json
import os
import shutil

import numpy as np
import pytest

from daemon import fsutil
from daemon.data import versions
from daemon.data.dataset import list_folder
from daemon.data.versions import VersionStore, is_validation
from daemon.inbox.sidecars import Sidecars
from daemon.training.store import CheckpointStore

is_image = Sidecars("json", ["png", "jpg"]).is_image_name


def test_list_folder_takes_class_folders_nested_files_and_nothing_else(tmp_path):
    for relative in ("Bag/a.png", "Bag/deep/er/b.JPG", "Coat/c.png", "Coat/notes.txt",
                     "Coat/c.png.json", ".hidden/d.png", "Bag/.e.png", "loose.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    os.symlink(tmp_path / "Bag/a.png", tmp_path / "Coat/link.png")
    os.symlink(tmp_path / "Bag", tmp_path / "Linked")
    os.mkfifo(tmp_path / "Coat/pipe.png")
    found, ignored, unlisted = list_folder(str(tmp_path), is_image)
    assert {path: entry[0] for path, entry in found.items()} == {
        "Bag/a.png": "Bag", "Bag/deep/er/b.JPG": "Bag", "Coat/c.png": "Coat"}
    assert sorted(ignored) == ["Coat/link.png", "Coat/pipe.png", "Linked", "loose.png"]
    assert unlisted == []


def test_a_version_is_committed_by_its_manifest_and_checked_when_read(tmp_path):
    store = VersionStore(tmp_path)
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    version = store.write("folder", ["A", "B"], x, [0, 1, 1], [False, True, False])
    assert store.numbers() == [1] and version.images == 3
    assert version["counts"] == {"train": 2, "validation": 1, "per_class": [1, 2]}
    np.testing.assert_array_equal(store.get(1).arrays()["x"], x)
    # A write cut short (an npz without a manifest, a temporary) is not a version and goes.
    (store.folder / "version-00000002.npz").write_bytes(b"partial")
    (store.folder / fsutil.temp_name(store.folder / "version-00000003.npz")).write_bytes(b"")
    assert store.newest().number == 1
    store.prune(keep=set())
    assert sorted(os.listdir(store.folder)) == [".last-version", "version-00000001.json",
                                                "version-00000001.npz"]
    # A damaged npz is refused (by a new process: this one keeps what it wrote in memory).
    versions._recent.clear()
    path = store.folder / "version-00000001.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="checksum"):
        store.get(1).arrays()


def test_prune_keeps_what_checkpoints_name_and_the_newest_two(tmp_path):
    store = VersionStore(tmp_path)
    for _ in range(5):
        store.write("folder", ["A"], np.zeros((1, 28, 28)), [0], [False])
    store.prune(keep={2})
    assert store.numbers() == [5, 4, 2]


def test_numbers_only_grow_whatever_is_deleted(tmp_path):
    """Versions and generations deleted (they look like a cache) or quarantined never give
    their numbers again: a checkpoint, a sidecar or a cache naming one stays true."""
    store = VersionStore(tmp_path)
    for _ in range(2):
        store.write("folder", ["A"], np.zeros((1, 28, 28)), [0], [False])
    for path in store.folder.glob("version-*"):
        path.unlink()
    assert VersionStore(tmp_path).write("folder", ["A"], np.zeros((1, 28, 28)), [0],
                                        [False]).number == 3
    # save/data/ emptied, its high-water file too: above what a checkpoint names.
    shutil.rmtree(store.folder)
    checkpoints = CheckpointStore(tmp_path)
    fake_generation(checkpoints, 1, 7, 0.5)
    assert VersionStore(tmp_path).write("folder", ["A"], np.zeros((1, 28, 28)), [0],
                                        [False]).number == 8
    for number in range(2, 4):
        fake_generation(checkpoints, number, 8, 0.5)
    for path in tmp_path.glob("ckpt-*"):
        path.unlink()
    fake_generation(checkpoints, 4, 8, 0.5)
    assert CheckpointStore(tmp_path).numbers() == [4]
    checkpoints.quarantine([4], with_exports=False)
    fake_generation(CheckpointStore(tmp_path), 5, 8, 0.5)
    assert CheckpointStore(tmp_path).numbers() == [5]


def test_the_validation_split_is_by_content_about_a_tenth():
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    share = sum(map(is_validation, digests)) / len(digests)
    assert 0.09 < share < 0.11
    assert is_validation(digests[7]) == is_validation(digests[7])


def fake_generation(store, number, version, accuracy, step=0, validation_images=100):
    meta = {"epoch": number, "step": step, "data_version": version,
            "validation_accuracy": accuracy, "validation_images": validation_images}
    store.write(meta, f"state {number}".encode(), {})


def test_the_best_is_a_contest_within_the_newest_scored_data_version(tmp_path):
    store = CheckpointStore(tmp_path)
    fake_generation(store, 1, 1, 0.80)
    fake_generation(store, 2, 1, 0.95)  # the best of version 1
    fake_generation(store, 3, 1, 0.90)
    fake_generation(store, 4, 1, 0.95)  # equal: the earlier one stays
    assert store.best().number == 2
    assert store.numbers() == [4, 3, 2]  # the newest two and the best
    fake_generation(store, 5, 2, None, step=7)  # mid-epoch of version 2: no contestant
    assert store.labelling("best").number == 2 and store.labelling("newest").number == 5
    fake_generation(store, 6, 2, 0.60)  # version 2's first: an easier 4-class contest is over
    assert store.best().number == 6
    assert store.numbers() == [6, 5]
    fake_generation(store, 7, 2, 0.70)
    fake_generation(store, 8, 2, 0.65)
    assert store.best().number == 7 and store.numbers() == [8, 7]
    # A damaged best is passed over.
    (tmp_path / "ckpt-00000007.npz").write_bytes(b"rot")
    assert store.best().number == 8


def test_widen_keeps_every_old_weight_and_the_optimizer_state():
    import keras

    from daemon.training import models

    model = models.build("mlp", seed=1, num_classes=3)
    x = np.random.default_rng(0).random((64, 28, 28), dtype=np.float32)
    model.fit(x, np.arange(64) % 3, epochs=1, batch_size=16, verbose=0)
    wider = models.widen(model, "mlp", 5, seed=1)
    assert wider.outputs[0].shape[-1] == 5
    for old, new in zip(model.variables, wider.variables):
        old, new = old.numpy(), new.numpy()
        np.testing.assert_array_equal(new[..., :old.shape[-1]] if old.ndim else new, old)
    kernel = wider.get_layer("output").kernel.numpy()
    assert np.abs(kernel[:, 3:]).sum() > 0  # new units start from seeded weights, not zeros
    assert int(wider.optimizer.iterations.numpy()) == 4
    moments = [(old.numpy(), new.numpy()) for old, new in
               zip(model.optimizer.variables, wider.optimizer.variables)
               if "output_kernel" in new.path]
    assert len(moments) == 2  # Adam's momentum and velocity
    for old, new in moments:
        np.testing.assert_array_equal(new[:, :3], old)
        assert old.any() and not new[:, 3:].any()
    # It trains on with every class.
    wider.fit(x, np.arange(64) % 5, epochs=1, batch_size=16, verbose=0)
    assert isinstance(wider, keras.Model)
    assert json.loads(wider.to_json())["config"]["layers"][-1]["config"]["units"] == 5


def test_a_version_without_validation_images_is_labelled_by_its_newest(tmp_path):
    store = CheckpointStore(tmp_path)
    fake_generation(store, 1, 1, 0.9)
    fake_generation(store, 2, 2, None, step=3, validation_images=0)  # mid-epoch: no say
    assert store.best().number == 1
    fake_generation(store, 3, 2, None, validation_images=0)
    fake_generation(store, 4, 2, None, validation_images=0)
    assert store.best().number == 4



def test_decode_all_survives_a_worker_killed_under_it(tmp_path, caplog):
    """A worker that dies (the OOM killer, a decoder crash) loses nothing: what was in
    flight is decoded again, and only a file that kills a worker on its own is "bad"."""
    import signal
    import threading

    import cv2

    from conftest import wait_until
    from daemon.inbox.decoding import Decoder

    rng = np.random.default_rng(1)
    paths = []
    for i in range(24):  # large enough to take a while each
        image = np.full((1500, 1500), 255, np.uint8)
        image[300:1200, 400:1100] = rng.integers(0, 120, (900, 700), dtype=np.uint8)
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], image)
    before = set(threading.enumerate())
    decoder = Decoder(workers=2)
    decoder.start()
    try:
        out = {}
        worker = threading.Thread(target=lambda: out.update(results=decoder.decode_all(
            paths, chunk=4)))
        worker.start()
        pids = wait_until(lambda: list(decoder._pool._processes), 30, message="workers")
        os.kill(pids[0], signal.SIGKILL)
        worker.join(120)
        assert not worker.is_alive() and "a decode worker died" in caplog.text
        assert [kind for _, kind, _ in out["results"]] == ["image"] * len(paths)
        assert [path for path, _, _ in out["results"]] == paths
    finally:
        decoder.stop()
    # The broken pool's manager thread ends by itself once it has reaped that pool's
    # workers, which on a busy machine can take longer than the test did
    wait_until(lambda: not [t for t in threading.enumerate() if t not in before and
                            t.is_alive()], 60, 0.1, message="the pools' threads to end")
