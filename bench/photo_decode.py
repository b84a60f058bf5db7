"""What reduced JPEG decoding saves: ms per 12-megapixel phone-sized JPEG (4032x3024, a
sample photo enlarged with sensor-like noise, quality 92), photos.load's way (decoded at
1/8, then cropped and resized to 224) against a full decode (then the same crop and resize),
and the decode alone at each scale. One process, one thread, best of a few repeats.

    PYTHONPATH=. python bench/photo_decode.py [PHOTO]
"""

import sys
import time
from pathlib import Path

import daemon  # noqa: F401, I001  (sets the pixel cap before cv2 loads)
import cv2
import numpy as np

from daemon.data import images, photos

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared/data/photos-sample"


def phone_jpeg(source):
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    image = cv2.resize(image, (4032, 3024), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 6, image.shape).astype(np.float32)
    ok, data = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
    return data.tobytes()


def best_ms(function, repeats=20):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def main():
    source = sys.argv[1] if len(sys.argv) > 1 else sorted(SAMPLE.glob("bees/*.jpg"))[0]
    data = phone_jpeg(source)
    print(f"{source}: 4032x3024, {len(data) / 1e6:.1f} MB")
    full = lambda: photos.fit(cv2.cvtColor(images._imdecode(data, cv2.IMREAD_COLOR),  # noqa
                                           cv2.COLOR_BGR2RGB))
    reduced = lambda: photos.fit(photos.decode(data))  # noqa: E731
    print(f"  photos.load's way (1/8): {best_ms(reduced):6.1f} ms")
    print(f"  full decode, same fit:   {best_ms(full):6.1f} ms")
    for reduction, flag in sorted(photos.JPEG_COLOUR.items(), reverse=True):
        print(f"  decode alone at 1/{reduction}:    "
              f"{best_ms(lambda: images._imdecode(data, flag)):6.1f} ms")
    print(f"  frame header + end check:{best_ms(lambda: photos._frame_size(data)):6.1f} ms")


if __name__ == "__main__":
    main()
