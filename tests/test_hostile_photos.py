"""Found by a hostile user of the photo feature: what a user does with class folders and
save/backbone/ while the daemon runs. Real `python -m daemon` subprocesses."""

import shutil

from conftest import wait_until  # noqa: F401  (the fixtures' helpers)
from test_photos_daemon import (PHOTOS, TRAIN_PHOTOS, HELD_OUT, backbone, photo_config,  # noqa: F401
                                photos, with_backbone)


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
