"""Prometheus metrics: defined here once, fed by the parts that know the numbers (the
labeller, the inbox watcher, the trainer, the checkpoint callback) through the functions
below, and served by the service when `metrics.listen` is set.

The metrics live in prometheus_client's default registry, beside its process and Python
collectors, for the life of the process: a reload never resets a counter. Feeding them costs
a lock and an addition, so the parts feed them whether or not anyone serves them.
"""

import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from daemon.errors import WardrobeError
from daemon.service.addresses import show_listen

log = logging.getLogger("daemon.metrics")  # the name users see: daemon.service.logs

LABELLED = Counter("wardrobe_images_labelled", "Sidecars written, by outcome: a label, or an "
                   "error for a file that is not an image we can read", ["outcome"])
BACKLOG = Gauge("wardrobe_inbox_backlog", "Images found in the inbox and not labelled yet")
LATENCY = Histogram("wardrobe_label_latency_seconds", "From an image found in the inbox to "
                    "its sidecar written", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                    120, 300, 900, 3600))
RETRYING = Gauge("wardrobe_inbox_retrying", "Images waiting to be tried again after an error "
                 "that can go away (a full disk, a permission, a file still being written)")
CANNOT_LABEL = Gauge("wardrobe_inbox_cannot_label", "Images that cannot have a sidecar (its "
                     "name too long, or a file of yours at the sidecar's path)")
RESCANS = Counter("wardrobe_inbox_rescans", "Full rescans of the inbox, by reason", ["reason"])
EPOCH = Gauge("wardrobe_training_epoch", "Epochs completed")
STEP = Gauge("wardrobe_training_step", "Batches trained in the current epoch")
LOSS = Gauge("wardrobe_training_loss", "Training loss: the current epoch's running mean, the "
             "last epoch's once it ends")
ACCURACY = Gauge("wardrobe_training_accuracy", "Training accuracy, like wardrobe_training_loss")
VALIDATION_ACCURACY = Gauge("wardrobe_validation_accuracy", "Accuracy on the validation images "
                            "at the last epoch end")
TRAINING = Gauge("wardrobe_training_active", "1 while epochs are being trained, 0 when the "
                 "target is reached or the trainer waits for data")
DATA_IMAGES = Gauge("wardrobe_data_images", "Images in the data version training uses "
                    "(training and validation)")
CHECKPOINT_SECONDS = Histogram("wardrobe_checkpoint_write_seconds", "Time to write a checkpoint "
                               "generation, fsyncs included", buckets=(0.01, 0.025, 0.05, 0.1,
                                                                       0.25, 0.5, 1, 2.5, 5, 10))
CHECKPOINT_FAILURES = Counter("wardrobe_checkpoint_failures", "Checkpoint writes that failed "
                              "(the previous generation stays)")
LAST_CHECKPOINT = Gauge("wardrobe_last_checkpoint_timestamp_seconds", "Unix time of the newest "
                        "checkpoint in save/")
CLUSTER_JOBS = Counter("wardrobe_cluster_jobs", "Featurizing jobs sent to the cluster's workers, "
                       "by worker and outcome: done (its answer used), late (answered after it "
                       "was done otherwise: ignored), refused, resent, local (done here)",
                       ["worker", "outcome"])
CLUSTER_QUEUE = Gauge("wardrobe_cluster_queue", "Jobs waiting in the broker's queue")
CLUSTER_WORKERS = Gauge("wardrobe_cluster_workers", "Workers alive and taking our jobs")
CLUSTER_LATENCY = Histogram("wardrobe_cluster_job_seconds", "From a job sent to its answer "
                            "taken", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

# Both series exist from the start, at 0; looked up once (labels() costs a lock and a dict).
_OUTCOMES = {outcome: LABELLED.labels(outcome) for outcome in ("label", "error")}


def labelled(outcome, found_at=None, now=None):
    """A sidecar was written; `found_at`: time.monotonic() when its image was found."""
    _OUTCOMES[outcome].inc()
    if found_at is not None:
        LATENCY.observe(max(0.0, (time.monotonic() if now is None else now) - found_at))


def inbox(backlog, retrying, cannot_label):
    BACKLOG.set(backlog)
    RETRYING.set(retrying)
    CANNOT_LABEL.set(cannot_label)


def rescanned(reason):
    RESCANS.labels(reason).inc()


def batch_trained(step, loss, accuracy):
    STEP.set(step)
    if loss is not None:
        LOSS.set(loss)
    if accuracy is not None:
        ACCURACY.set(accuracy)


def epoch_ended(epoch, loss, accuracy, validation_accuracy):
    EPOCH.set(epoch)
    STEP.set(0)
    for gauge, value in ((LOSS, loss), (ACCURACY, accuracy),
                         (VALIDATION_ACCURACY, validation_accuracy)):
        if value is not None:
            gauge.set(value)


def training(active):
    TRAINING.set(1 if active else 0)


def data_images(count):
    DATA_IMAGES.set(count)


def checkpoint_written(seconds):
    CHECKPOINT_SECONDS.observe(seconds)
    LAST_CHECKPOINT.set(time.time())


def checkpoint_restored(unix_time):
    LAST_CHECKPOINT.set(unix_time)


def checkpoint_failed():
    CHECKPOINT_FAILURES.inc()


def cluster_job(worker, outcome, seconds=None):
    CLUSTER_JOBS.labels(worker, outcome).inc()
    if seconds is not None:
        CLUSTER_LATENCY.observe(seconds)


def cluster(queue, workers):
    CLUSTER_QUEUE.set(queue)
    CLUSTER_WORKERS.set(workers)


def serve(listen):
    """Serve /metrics on `listen` ((host, port)) from prometheus_client's own server, whose
    threads end with the process. A port that cannot be had is fatal (exit 1)."""
    host, port = listen
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as error:
        raise WardrobeError(f"metrics.listen: cannot serve metrics on {show_listen(listen)}: "
                            f"{error.strerror or error}") from None
    log.info("serving Prometheus metrics at http://%s/metrics", show_listen(listen))
    return server
