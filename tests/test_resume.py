"""Exact resume: interrupted runs end bit-identical to an uninterrupted one."""

import random
import re
import shutil
import signal

import numpy as np
import pytest

from conftest import Daemon, assert_loadable, newest_state, run_to_completion, status, wait_until, write_config
from daemon.training.store import CheckpointStore

_references = {}


@pytest.fixture
def reference(tmp_path_factory, small_data):
    """Final (manifest, arrays) of an uninterrupted run, one per train settings."""

    def get(**train):
        key = tuple(sorted(train.items()))
        if key not in _references:
            folder = tmp_path_factory.mktemp("reference")
            daemon = Daemon(write_config(folder, small_data, **train))
            try:
                daemon.wait_for_log(r"training complete", 180)
            finally:
                assert daemon.stop() == 0, daemon.log
            _references[key] = newest_state(folder / "save")
        return _references[key]

    return get


def assert_same_final_state(save, expected):
    manifest, arrays = newest_state(save)
    expected_manifest, expected_arrays = expected
    assert manifest["epoch"] == expected_manifest["epoch"] and manifest["step"] == 0
    assert sorted(arrays) == sorted(expected_arrays)
    different = [name for name in arrays if not np.array_equal(arrays[name], expected_arrays[name])]
    assert not different, f"not bit-identical: {different}"
    assert [h["loss"] for h in manifest["history"]] == \
        [h["loss"] for h in expected_manifest["history"]]


def test_sigterm_mid_epoch_exits_0_and_resumes_at_that_batch(tmp_path, small_data, daemons,
                                                             reference):
    # 925 batches an epoch (the 90 % of 1,024 images that do not validate, one a batch): a
    # wide window, several seconds, for the SIGTERM to land inside epoch 2 on a busy machine
    train = {"epochs": 2, "batch_size": 1, "checkpoint_every": 50}
    config = write_config(tmp_path, small_data, **train)
    daemon = daemons(config)
    wait_until(lambda: (lambda s: s["epoch"] == 1 and s["step"] >= 50)(status(config)), 60,
               message="a checkpoint inside epoch 2")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log
    stopped = re.search(r"stopped at batch (\d+) of epoch 2; checkpoint", daemon.log)
    assert stopped, daemon.log
    batch = int(stopped.group(1))
    assert 0 < batch < 925
    assert (status(config)["epoch"], status(config)["step"]) == (1, batch)

    resumed = run_to_completion(daemons, config)
    assert re.search(rf"resuming from .*: epoch 1/2, batch {batch}\b", resumed.log), resumed.log
    assert_same_final_state(tmp_path / "save", reference(**train))


def test_random_sigkills_and_sigterms_end_bit_identical(tmp_path, small_data, daemons, reference):
    rng = random.Random(20261126)
    config = write_config(tmp_path, small_data)
    save = tmp_path / "save"
    interruptions = []
    for round_ in range(8):
        daemon = daemons(config)
        daemon.wait_for_log(r"(no checkpoint in|resuming from)")
        if not CheckpointStore(save).numbers():
            # On a loaded machine the first batches can take longer than any moment below:
            # let the first checkpoint exist, so what follows is a resume, not a fresh start.
            wait_until(lambda: CheckpointStore(save).numbers(), 120, message="a checkpoint")
        moment = rng.uniform(0.0, 1.2)
        how = signal.SIGTERM if round_ % 3 == 2 else signal.SIGKILL
        try:
            daemon.process.wait(timeout=moment)  # the random moment to strike at
        except Exception:
            pass
        if daemon.process.poll() is not None:
            break
        daemon.signal(how)
        code = daemon.wait()
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), daemon.log
        interruptions.append(how.name)
        if save.exists() and CheckpointStore(save).numbers():
            assert_loadable(save)
    assert interruptions.count("SIGKILL") >= 4, interruptions
    resumed = run_to_completion(daemons, config)
    assert "resuming from" in resumed.log
    assert_same_final_state(save, reference())


STRACE = shutil.which("strace")


# In a resumed run a generation is: fsync+rename state file (1), model.json (2, first
# generation only), model.h5 (3); fsync folder (4); fsync+rename manifest (5, the commit);
# fsync folder (6).
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
@pytest.mark.parametrize("syscall,when", [
    ("fsync", 1), ("rename", 1), ("rename", 3), ("fsync", 4), ("fsync", 5), ("rename", 4),
    ("fsync", 6),
])
def test_sigkill_inside_a_checkpoint_write_leaves_save_loadable(tmp_path, small_data, daemons,
                                                                reference, one_epoch_save,
                                                                syscall, when):
    """strace delivers SIGKILL at the Nth fsync or rename: every step of the protocol.
    (Not --seccomp-bpf: with it, strace 6.1 never fires `when` counts above 1 in a thread.)"""
    save = tmp_path / "save"
    shutil.copytree(one_epoch_save, save)
    before = CheckpointStore(save).scan()[0].number
    config = write_config(tmp_path, small_data)  # 3 epochs: training continues from 1
    killed = daemons(config, wrapper=[
        STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
        "-e", f"inject={syscall}:signal=SIGKILL:when={when}"])
    killed.wait(120)
    assert "training complete" not in killed.log, "the injected SIGKILL never struck"
    assert assert_loadable(save).number >= before
    resumed = run_to_completion(daemons, config)
    assert not [p.name for p in save.iterdir() if p.name.endswith(".tmp")]
    assert "resuming from" in resumed.log
    assert_same_final_state(save, reference())
