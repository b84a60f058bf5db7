"""12-megapixel JPEGs that look like phone photos of a garment: a sample crop, enlarged,
dark on a light, textured, noisy background with uneven lighting; JPEG quality 90, a few
MB each. Made once and cached (making 600 takes a minute or two).
"""

import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

CACHE = Path("/tmp/wardrobe-bench-photos")
VERSION = "v1"  # change when the look changes: a new cache folder
HEIGHT, WIDTH = 3024, 4032
BACKGROUNDS = 4


def cached(count, crops):
    """Paths of `count` photos, made now if the cache does not hold them yet."""
    folder = CACHE / f"{VERSION}-{count}"
    if (folder / "complete").exists():
        return sorted(folder.glob("*.jpg"))
    partial = CACHE / f"{VERSION}-{count}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    backgrounds = [_background(np.random.default_rng([1, i])) for i in range(BACKGROUNDS)]
    jobs = [(partial / f"photo-{i:04d}.jpg", crops[i % len(crops)], i) for i in range(count)]
    # spawn, not fork: this process may have TensorFlow's threads running.
    with ProcessPoolExecutor(os.cpu_count(), multiprocessing.get_context("spawn"), _share,
                             (backgrounds,)) as pool:
        list(pool.map(_make, *zip(*jobs), chunksize=8))
    (partial / "complete").write_text(f"{count}\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(partial, folder)
    return sorted(folder.glob("*.jpg"))


def _background(rng):
    """A light surface: coarse and fine texture, light falling off from one side, colour
    cast and sensor noise."""
    coarse = cv2.resize(rng.uniform(-1, 1, (48, 64)).astype(np.float32), (WIDTH, HEIGHT),
                        interpolation=cv2.INTER_CUBIC) * 5
    fine = cv2.resize(rng.uniform(-1, 1, (HEIGHT // 4, WIDTH // 4)).astype(np.float32),
                      (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) * 4
    y, x = np.ogrid[0:HEIGHT, 0:WIDTH]
    cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
    light = 1.0 - 0.15 * (((x - cx) ** 2 + (y - cy) ** 2) / WIDTH ** 2).astype(np.float32)
    gray = (rng.uniform(200, 225) + coarse + fine) * light
    cast = rng.uniform(0.93, 1.04, size=3).astype(np.float32)
    noise = rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * 6
    return np.clip(gray[:, :, None] * cast + noise, 0, 255).astype(np.uint8)


_backgrounds = None


def _share(backgrounds):
    global _backgrounds
    _backgrounds = backgrounds


def _make(path, crop, index):
    rng = np.random.default_rng([2, index])
    photo = _backgrounds[index % len(_backgrounds)].copy()
    if index // len(_backgrounds) % 2:
        photo = photo[:, ::-1].copy()  # more variety from the same few backgrounds
    size = int(rng.uniform(0.45, 0.8) * HEIGHT)
    top = int(rng.integers(0, HEIGHT - size))
    left = int(rng.integers(0, WIDTH - size))
    shape = cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
    alpha = shape.astype(np.float32)[:, :, None] / 255.0
    area = photo[top: top + size, left: left + size].astype(np.float32)
    colour = rng.uniform(20, 140, size=3).astype(np.float32)
    # The garment keeps the background's lighting and noise (it is in the same photo).
    shaded = colour * (area / max(float(area.mean()), 1.0))
    area = area * (1.0 - alpha) + shaded * alpha
    photo[top: top + size, left: left + size] = np.clip(area, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    Path(path).write_bytes(data.tobytes())
