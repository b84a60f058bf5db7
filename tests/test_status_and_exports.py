"""`status` without TensorFlow, and the tutorial's own loading code on save/."""

import json
import shlex
import subprocess
import sys

from conftest import REPO, status, write_config
from test_config import run_cli


def test_status_before_any_checkpoint(tmp_path, small_data):
    config = write_config(tmp_path, small_data, epochs=7)
    result = run_cli("status", "--json", "--config", str(config))
    assert result.returncode == 0 and "NO-TF" in result.stderr
    report = json.loads(result.stdout)
    assert (report["epoch"], report["step"], report["epochs"]) == (0, 0, 7)
    assert report["loss"] is None and report["accuracy"] is None
    human = run_cli("status", "--config", str(config))
    assert "no checkpoint yet: epoch 0/7" in human.stdout


def test_status_reports_the_newest_checkpoint(tmp_path, small_data, one_epoch_save):
    import shutil

    shutil.copytree(one_epoch_save, tmp_path / "save")
    config = write_config(tmp_path, small_data, epochs=5)
    manifest = json.loads(max((tmp_path / "save").glob("ckpt-*.json")).read_text())
    report = status(config)
    assert (report["epoch"], report["step"], report["epochs"]) == (1, 0, 5)
    assert report["loss"] == manifest["loss"] and report["accuracy"] == manifest["accuracy"]
    assert 0 < report["loss"] < 5 and 0 < report["accuracy"] <= 1
    human = run_cli("status", "--config", str(config))
    assert "epoch 1/5, batch 0" in human.stdout and "not running" in human.stdout
    assert f"loss {manifest['loss']:.4f}" in human.stdout


def test_status_into_a_pipe_closed_early_exits_0_quietly(tmp_path, small_data):
    """`status | head -1`: head exits after the first line and the rest meets a closed pipe.
    A checkpoint naming a model with a megabyte-long name makes the lines after the first
    longer than a pipe holds, so the error happens every time, not by chance."""
    from daemon.training.store import CheckpointStore

    config = write_config(tmp_path, small_data, epochs=5)
    CheckpointStore(tmp_path / "save").write(
        {"epoch": 1, "step": 0, "fingerprint": {"model": "m" * 1_000_000}}, b"state", {})
    command = (f"set -o pipefail; {shlex.quote(sys.executable)} -m daemon status "
               f"--config {shlex.quote(str(config))} | head -1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "wardrobe: not running; epoch 1/5, batch 0\n"


TUTORIAL = """
import sys, numpy as np, keras
from daemon.data import dataset
model = keras.models.model_from_json(open('save/model.json').read())
model.load_weights('save/model.h5')
model.compile(loss='sparse_categorical_crossentropy', metrics=['accuracy'])
data = dataset.read_idx_folder(sys.argv[1], 'test')
loss, accuracy = model.evaluate(data.x_test / 255.0, data.y_test, verbose=0)
print(f'accuracy {accuracy:.4f}')
"""


def test_the_tutorials_loading_code_works_on_save(tmp_path, small_data, daemons):
    from conftest import run_to_completion

    config = write_config(tmp_path, small_data, epochs=2)
    daemon = run_to_completion(daemons, config)
    reported = float(daemon.wait_for_log(r"test loss [\d.]+ accuracy ([\d.]+)").group(1))
    result = subprocess.run([sys.executable, "-c", TUTORIAL, str(small_data)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"accuracy {reported:.4f}"
