"""Found by a hostile user of the photo feature: what a user does with class folders and
save/backbone/ while the daemon runs. Real `python -m daemon` subprocesses."""

import re
import shutil

from conftest import PHOTOS, TRAIN_PHOTOS, HELD_OUT, photo_config, wait_until, with_backbone  # noqa: F401


def test_a_class_folder_moved_out_of_the_data_folder_is_noticed(tmp_path, photos, backbone,
                                                               daemons):
    """`mv data/wasps ~/Desktop/` while the daemon runs: inotify reports only the folder's
    IN_MOVED_FROM (its files raise nothing), which the watcher dropped, so the class stayed
    in the data (trained on, counted in status) until some other change or the hourly
    rescan. It must be taken out like a deleted folder: a WARNING and a new data version."""
    data = shutil.copytree(photos.data, tmp_path / "data")
    extra = sorted(p for p in (PHOTOS / "bees").glob("*.jpg") if " " not in p.name)
    (data / "wasps").mkdir()
    for path in extra[TRAIN_PHOTOS + HELD_OUT: TRAIN_PHOTOS + HELD_OUT + 6]:
        shutil.copyfile(path, data / "wasps" / path.name)
    config = photo_config(tmp_path, data, epochs=2, epochs_per_update=1)
    with_backbone(tmp_path / "save", backbone)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 240)
    assert "3 classes" in daemon.log, daemon.log
    shutil.move(str(data / "wasps"), str(tmp_path / "moved-out"))  # a rename: same file system
    daemon.wait_for_log(r"class 'wasps' has no images in .* any more", 30)
    daemon.wait_for_log(r"data version 2: 32 images", 30)
    assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log


def test_a_backbone_changed_or_deleted_while_running_never_labels_nor_crashes(
        tmp_path, photos, backbone, daemons):
    """save/backbone/*.tflite is checked at start, but a decode worker loaded it only at its
    first photo (or when it replaced a dead worker), unchecked: changed in place meanwhile,
    the photo got features of another network -- a wrong label, and for a training photo
    wrong features kept for good in save/features/ under the good backbone's id; deleted,
    the daemon died with a worker's traceback. Now: a clear error (exit 1, no sidecar
    written with it), and the next start converts the backbone anew and labels the photo."""
    config = photo_config(tmp_path, photos.data, epochs=1)
    with_backbone(tmp_path / "save", backbone)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 240)
    model, = (tmp_path / "save" / "backbone").glob("*.tflite")
    blob = bytearray(model.read_bytes())
    start = int(len(blob) * 0.9) // 4 * 4  # weights: flip the sign of 100,000 floats
    for i in range(start, start + 400_000, 4):
        blob[i + 3] ^= 0x80
    with open(model, "r+b") as file:  # in place, as a disk error or a careless tool would
        file.write(blob)
    inbox = tmp_path / "inbox"
    image = inbox / photos.held[0].name
    shutil.copyfile(photos.held[0], image)
    assert daemon.wait(60) == 1, daemon.log
    assert "changed while the daemon ran" in daemon.log, daemon.log
    assert "Traceback" not in daemon.log, daemon.log
    assert not (inbox / (image.name + ".json")).exists()

    again = daemons(config)
    again.wait_for_log(r"does not match its checksum.*converting the backbone again", 60)
    wait_until(lambda: (inbox / (image.name + ".json")).exists(), 120, message="sidecar")
    assert again.stop() == 0, again.log
    assert "Traceback" not in again.log, again.log

    third = daemons(config)  # no photo featurized yet: its workers have not loaded it
    third.wait_for_log(r"ready: model restored", 60)
    model.unlink()  # deleted while it runs
    second = inbox / photos.held[1].name
    shutil.copyfile(photos.held[1], second)
    assert third.wait(60) == 1, third.log
    assert re.search(r"tflite: No such file or directory; it was deleted", third.log), third.log
    assert "Traceback" not in third.log, third.log
    assert not (inbox / (second.name + ".json")).exists()
