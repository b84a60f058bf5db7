"""Numbers that only grow: data versions, checkpoint generations.

A number names one thing for good (a checkpoint names its data version, a sidecar its
checkpoint, a cache its version's arrays), so it must never be given twice, even after the
files it numbered were deleted (they look like a cache) or quarantined. The next number is
above the largest of: what the folder lists, a small high-water file of its own (hidden,
beside what it numbers), what the caller says is named elsewhere (the checkpoints' data
versions), and what this process has seen.
"""

import logging
from pathlib import Path

from daemon import fsutil

log = logging.getLogger(__name__)


class Sequence:
    def __init__(self, folder, name, named_elsewhere=lambda: 0):
        self.path = Path(folder) / name
        self.named_elsewhere = named_elsewhere
        self.seen = 0  # the largest number this process has listed or given

    def listed(self, numbers):
        """Remember what a listing of the folder held; returns `numbers`."""
        self.seen = max([self.seen, *numbers])
        return numbers

    def next(self, numbers):
        """The number for a new item, given the folder's `numbers`. The high-water file is
        written (fsynced, renamed, not the folder) before the item: the caller's folder
        fsync, before it commits the item in the same folder, makes it durable. A crash in
        between leaves a gap, never a number given twice."""
        number = max([self.seen, *numbers, self._recorded(), self.named_elsewhere()]) + 1
        fsutil.write_new(self.path, f"{number}\n".encode(), sync_folder=False)
        self.seen = number
        return number

    def _recorded(self):
        try:
            return int(self.path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:  # the others still count
            log.warning("%s is unreadable (%s); numbering from what else is known",
                        self.path, error)
            return 0
