"""Process-wide tuning the ``atoll`` command applies at start."""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Let glibc keep freed megabyte-sized buffers for reuse.

    Data-plane chunks are ~1 MiB; by default glibc serves each from a fresh mmap and returns it
    at free, and the page faults cost ~15% of transfer throughput (measured with
    bench/dataplane.py). Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 8 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 128 << 20))
