"""Monitoring from outside: Prometheus metrics scraped from a real daemon (parsed with
prometheus_client's own parser), and TensorBoard event files read back with TensorBoard's
own readers -- and its server -- after SIGKILLs, resumes and a rollback."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import newest_state, status, wait_until, write_config
from daemon.data import dataset

RUNS = {"train": ["epoch_loss", "epoch_accuracy", "checkpoint_seconds", "images_labelled"],
        "validation": ["epoch_loss", "epoch_accuracy", "confusion_matrix/10 classes"]}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_metrics(config, port):
    config.write_text(config.read_text() + f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    return config


def scrape(port):
    """{(name, ((label, value), ...)): value} of every sample at /metrics, or None while
    nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def png(index):
    return cv2.imencode(".png", dataset.load("sample").x_test[index])[1].tobytes()


def test_metrics_move_as_images_are_dropped_and_epochs_pass(tmp_path, small_data, daemons):
    port = free_port()
    config = with_metrics(write_config(tmp_path, small_data, epochs=3), port)
    started = time.time()
    daemon = daemons(config)
    first = wait_until(lambda: scrape(port), 60, interval=0.2, message="/metrics answering")
    assert value(first, "wardrobe_images_labelled_total", outcome="label") == 0
    assert value(first, "wardrobe_images_labelled_total", outcome="error") == 0
    # the library's default process and Python metrics are there too
    assert value(first, "process_resident_memory_bytes") > 0
    assert value(first, "process_cpu_seconds_total") is not None
    assert any(name == "python_info" for name, _ in first)

    daemon.wait_for_log(r"training complete", 120)
    trained = scrape(port)
    assert value(trained, "wardrobe_training_epoch") == 3
    assert value(trained, "wardrobe_training_step") == 0
    assert value(trained, "wardrobe_training_active") == 0
    manifest, _ = newest_state(tmp_path / "save")
    last = manifest["history"][-1]
    assert value(trained, "wardrobe_training_loss") == pytest.approx(last["loss"])
    assert value(trained, "wardrobe_training_accuracy") == pytest.approx(last["accuracy"])
    assert value(trained, "wardrobe_validation_accuracy") == pytest.approx(last["val_accuracy"])
    assert value(trained, "wardrobe_data_images") == status(config)["images"] == 1024
    # 58 batches an epoch, a checkpoint every 5 and at each end: 12 an epoch
    writes = value(trained, "wardrobe_checkpoint_write_seconds_count")
    assert writes >= 3 * 12, writes
    assert 0 < value(trained, "wardrobe_checkpoint_write_seconds_sum") < writes * 5
    assert value(trained, "wardrobe_checkpoint_failures_total") == 0
    assert started <= value(trained, "wardrobe_last_checkpoint_timestamp_seconds") <= time.time()
    assert value(trained, "wardrobe_inbox_rescans_total", reason="startup") == 1

    inbox = tmp_path / "inbox"
    for index in range(5):
        (inbox / f"shirt-{index}.png").write_bytes(png(index))
    (inbox / "broken.png").write_bytes(b"not an image at all")
    (inbox / ("n" * 248 + ".png")).write_bytes(png(5))  # no room for ".json" in its name
    labelled = wait_until(lambda: (s := scrape(port)) and value(
        s, "wardrobe_images_labelled_total", outcome="error") == 1 and value(
        s, "wardrobe_images_labelled_total", outcome="label") == 5 and s, 60,
        interval=0.2, message="5 labels and 1 error counted")
    assert value(labelled, "wardrobe_label_latency_seconds_count") == 6
    assert 0 < value(labelled, "wardrobe_label_latency_seconds_sum") < 6 * 60
    assert value(labelled, "wardrobe_inbox_backlog") == 0
    assert value(labelled, "wardrobe_inbox_retrying") == 0
    assert wait_until(lambda: value(scrape(port), "wardrobe_inbox_cannot_label") == 1, 30,
                      interval=0.2, message="the long name counted")

    daemon.signal(signal.SIGUSR2)
    wait_until(lambda: value(scrape(port), "wardrobe_inbox_rescans_total", reason="signal") == 1,
               30, interval=0.2, message="the SIGUSR2 rescan counted")

    # A reload: counters keep counting, training goes on to the new target, and a new
    # listen address waits for a restart (the old one keeps serving).
    config.write_text(config.read_text().replace("epochs: 3", "epochs: 4")
                      .replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(r"reload: metrics.listen changed; that takes a restart", 30)
    reloaded = wait_until(lambda: (s := scrape(port)) and value(
        s, "wardrobe_training_epoch") == 4 and s, 120, interval=0.2, message="epoch 4")
    assert value(reloaded, "wardrobe_images_labelled_total", outcome="label") == 5
    assert value(reloaded, "wardrobe_images_labelled_total", outcome="error") == 1
    assert value(reloaded, "wardrobe_checkpoint_write_seconds_count") >= writes + 12
    # TensorBoard counts the sidecars written since the epoch before: all six in epoch 4
    _, curves = read_events(tmp_path / "save" / "tensorboard")
    assert {epoch: int(count) for epoch, count in curves["train"]["images_labelled"].items()} \
        == {1: 0, 2: 0, 3: 0, 4: 6}
    wait_until(lambda: value(scrape(port), "wardrobe_inbox_rescans_total", reason="reload") == 1,
               30, interval=0.2, message="the reload's rescan counted")
    assert daemon.stop() == 0, daemon.log


def test_a_port_already_taken_is_an_error_at_start(tmp_path, small_data, daemons):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = with_metrics(write_config(tmp_path, small_data), port)
        daemon = daemons(config)
        assert daemon.wait(60) == 1
    assert re.search(rf"ERROR daemon: metrics.listen: cannot serve metrics on 127.0.0.1:{port}:"
                     r" Address already in use", daemon.log), daemon.log
    assert not list((tmp_path / "save").glob("ckpt-*")), "it trained before failing"


def read_events(folder):
    """{run: Counter((tag, step))} of every event in save/tensorboard, each file read with
    TensorBoard's own loader, and {run: {tag: {step: value}}} as its accumulator sees it."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    counts, curves = {}, {}
    for run in RUNS:
        counts[run] = Counter()
        for path in sorted((folder / run).iterdir()):
            for event in EventFileLoader(str(path)).Load():
                for item in event.summary.value:
                    counts[run][item.tag, event.step] += 1
        accumulator = event_accumulator.EventAccumulator(
            str(folder / run), size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        curves[run] = {tag: {e.step: tensor_util.make_ndarray(e.tensor_proto)
                             for e in accumulator.Tensors(tag)}
                       for tag in accumulator.Tags()["tensors"]}
    return counts, curves


def assert_each_epoch_once(folder, epochs, history):
    counts, curves = read_events(folder)
    for run, tags in RUNS.items():
        steps = range(1, epochs + 1)
        for tag in tags:
            found = {step: counts[run][tag, step] for tag_, step in counts[run] if tag_ == tag}
            assert found == {step: 1 for step in steps}, (run, tag, found)
    # The curves are the checkpoint's history: nothing from an epoch that was rolled back.
    for entry in history:
        epoch = entry["epoch"]
        assert curves["train"]["epoch_loss"][epoch] == pytest.approx(entry["loss"], abs=1e-6)
        assert curves["validation"]["epoch_accuracy"][epoch] == pytest.approx(
            entry["val_accuracy"], abs=1e-6)
    picture = curves["validation"]["confusion_matrix/10 classes"][epochs]  # [w, h, png]
    image = cv2.imdecode(np.frombuffer(picture[2], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] >= 200
    return curves


def test_each_epoch_once_in_tensorboard_after_kills_resumes_and_a_rollback(
        tmp_path, small_data, daemons):
    config = write_config(tmp_path, small_data, epochs=6)
    save = tmp_path / "save"
    tensorboard = save / "tensorboard"
    # SIGKILL right after an epoch's log line (its checkpoint committed, its curves being
    # drawn), then inside an epoch, then after a later epoch.
    for moment in (r"epoch 1/6: loss", r"first batch trained", r"epoch 4/6: loss"):
        daemon = daemons(config)
        daemon.wait_for_log(moment, 120)
        daemon.kill()
    final = daemons(config)
    final.wait_for_log(r"training complete", 120)
    assert final.stop() == 0, final.log
    manifest, _ = newest_state(save)
    assert_each_epoch_once(tensorboard, 6, manifest["history"])

    # The curves of the last epoch lost (a kill between the commit and the drawing): drawn
    # again from the checkpoint at the next start, its confusion matrix too.
    for run in RUNS:
        (tensorboard / run / "events.out.tfevents.0000000006.wardrobe").unlink()
    redraw = daemons(config)
    redraw.wait_for_log(r"training complete", 120)
    assert redraw.stop() == 0, redraw.log
    assert_each_epoch_once(tensorboard, 6, manifest["history"])

    # A rollback: the newest checkpoint damaged, so the daemon resumes from an older one
    # inside epoch 6. The curves of epoch 6 go, and come back once, when it is trained again.
    newest = max(save.glob("ckpt-*.npz"))
    newest.write_bytes(b"damaged")
    again = daemons(config)
    again.wait_for_log(r"TensorBoard: removed epoch 6 of train", 120)
    again.wait_for_log(r"training complete", 120)
    assert again.stop() == 0, again.log
    manifest, _ = newest_state(save)
    curves = assert_each_epoch_once(tensorboard, 6, manifest["history"])

    # TensorBoard itself serves the curves: each epoch once.
    port = free_port()
    board = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir",
                              str(tensorboard), "--host", "127.0.0.1", "--port", str(port),
                              "--load_fast", "false"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        url = (f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=validation"
               "&tag=epoch_accuracy")

        def points():
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return json.loads(answer.read()) or None
            except (OSError, ValueError):
                return None

        served = wait_until(points, 90, interval=0.5, message="TensorBoard serving the curve")
        assert [step for _, step, _ in served] == [1, 2, 3, 4, 5, 6]
        assert [v for _, _, v in served] == pytest.approx(
            [float(curves["validation"]["epoch_accuracy"][e]) for e in range(1, 7)])
    finally:
        board.kill()
        board.wait()
