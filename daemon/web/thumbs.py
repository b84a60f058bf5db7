"""Thumbnails for the review page: a JPEG at most EDGE pixels a side, made once per image
content and kept in save/thumbs/ (named by a hash of the image's path, size, mtime and
inode: a changed image gets a new one; `prune()` bounds the folder)."""

import hashlib
import io
import logging
import os

import cv2

from daemon import fsutil
from daemon.data import images
from daemon.web.paths import open_beneath

log = logging.getLogger("daemon.web")

EDGE = 256
KEEP = 200_000  # thumbnails kept (about 10 KB each): a 100,000-image inbox twice over
PRUNE_EVERY = 1000  # thumbnails made between two looks at how many there are


class Thumbs:
    def __init__(self, save, root):
        self.folder = os.path.join(save, "thumbs")
        self.root = root  # the inbox's real path: images are opened beneath it
        self._made = 0

    def get(self, path, relative):
        """The JPEG bytes of `path`'s thumbnail; images.BadImage or Unreadable."""
        try:
            fd = open_beneath(self.root, path)
        except OSError as error:
            raise images.Unreadable(f"cannot open: {error.strerror}") from None
        try:
            info = os.fstat(fd)
            key = hashlib.sha256(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\0"
                                 f"{info.st_ino}".encode()).hexdigest()[:40]
            cached = os.path.join(self.folder, key[:2], key + ".jpg")
            try:
                with open(cached, "rb") as file:
                    return file.read()
            except FileNotFoundError:
                pass
            if info.st_size > images.MAX_FILE_BYTES:
                raise images.BadImage(f"file too large: {info.st_size} bytes")
            data = thumbnail(os.pread(fd, info.st_size, 0))
        finally:
            os.close(fd)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fsutil.publish(cached, data)  # not durable: a lost one is made again
        self._made += 1
        if self._made % PRUNE_EVERY == 1:  # the first, then every PRUNE_EVERY
            self.prune()
        return data

    def prune(self, keep=KEEP):
        """Remove the least recently made thumbnails beyond `keep`."""
        made = []
        for _, entries, _ in fsutil.walk(self.folder):
            made += [(entry.stat().st_mtime, entry.path) for entry in entries
                     if entry.name.endswith(".jpg")]
        made.sort()
        for _, path in made[:max(0, len(made) - keep)]:
            fsutil.unlink_if_present(path)


def thumbnail(data):
    """Image bytes -> JPEG bytes at most EDGE a side, as seen (EXIF orientation applied)."""
    Image, ImageOps = images.pillow()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > images.MAX_PIXELS:
                raise images.BadImage(f"image too large: over {images.MAX_PIXELS} pixels")
            image.draft("RGB", (EDGE, EDGE))  # a JPEG decoded at 1/2 to 1/8 scale
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                background = Image.new("RGB", image.size, "white")
                background.paste(image.convert("RGBA"), mask=image.convert("RGBA"))
                image = background
            image = image.convert("RGB")
            image.thumbnail((EDGE, EDGE))
            image.info.clear()  # no comment, EXIF or profile of the photo's in the thumbnail
            out = io.BytesIO()
            image.save(out, "JPEG", quality=80)
            return out.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        pass  # not one Pillow reads (or reads well): OpenCV's way
    picture = images.to_8bit(images.decode_as_seen(data), colour=True)
    scale = EDGE / max(picture.shape[:2])
    if scale < 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise images.BadImage("cannot make a thumbnail")
    return encoded.tobytes()
