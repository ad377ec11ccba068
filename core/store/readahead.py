"""Read the files behind memory-mapped arrays into the page cache ahead of the pages' random reads.

The groups page maps the clustering's snapshot (embeddings) and the pixel cache, and a class picked
for the first time reads a few hundred scattered rows of each: on a server that has just started, or
after other work pushed those files out of the page cache, every row is a page fault to disk. At
1.28 million images that made the first pick of a class take 0.4-1 s (15-96 ms of representatives
and 240-375 ms of sheets in the server, against 2 and 5 ms once cached). `read_ahead` asks the kernel
to read a mapped file in the background (`madvise(MADV_WILLNEED)`), only when the file is a small
share of the memory available, so a cache larger than RAM is never forced in.
"""
from __future__ import annotations

import mmap
import threading

import numpy as np

SHARE = 0.25  # read ahead a file only if it is at most this share of the memory available now


def available_memory() -> int | None:
    """Bytes of memory available for new work (Linux's MemAvailable: free memory plus reclaimable page
    cache); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mapping(array) -> mmap.mmap | None:
    """The `mmap` behind a `np.memmap` (or a view of one); None for an array in memory."""
    while isinstance(array, np.ndarray):
        mm = getattr(array, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        array = array.base
    return array if isinstance(array, mmap.mmap) else None


def read_ahead(array, share: float = SHARE, wait: bool = False) -> bool:
    """Ask the kernel to read the whole file behind memory-mapped `array` into the page cache, in a
    background thread (`wait`: in this one). Returns False, doing nothing, for an array that is not
    mapped, a platform without `madvise`, or a file larger than `share` of the available memory."""
    mm = _mapping(array)
    advice = getattr(mmap, "MADV_WILLNEED", None)
    if mm is None or advice is None or not hasattr(mm, "madvise"):
        return False
    available = available_memory()
    if available is None or len(mm) > share * available:
        return False

    def advise() -> None:
        try:
            mm.madvise(advice)
        except (OSError, ValueError):  # closed meanwhile, or refused: the reads fault the pages in instead
            pass

    if wait:
        advise()
    else:
        threading.Thread(target=advise, name="redex-read-ahead", daemon=True).start()
    return True
