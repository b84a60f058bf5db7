"""The inbox side: image files dropped into inbox/ in, one sidecar each out.

Owns everything between a file appearing under inbox/ and its label beside it: `watch` (the
one folder watcher: inotify or polling, scans), `inbox` (which images need a label; a
sidecar follows its image's renames and deletions), `labeller` (the loop: decode, one
batched predict, write), `decoding` (the spawn-started worker processes that decode images
and write sidecars), `sidecars` (their format and atomic writes), `classifier` (the
checkpoint that labels, as one compiled predict) and `relabel` (`wardrobe relabel`).

In: paths from the file system; pixels from daemon.data.images; the checkpoint to label
with, read from save/ through daemon.training.store and models. Out: sidecar files beside
the images; counts for daemon.service.metrics and `status`. The data side borrows `watch`
and the decode workers for a folder of training images.
"""
