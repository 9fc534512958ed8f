"""Process-wide tuning the ``atoll`` command applies at start (``tune_process``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

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


GC_GEN0_THRESHOLD = 20_000  # allocations between young-generation collections (CPython: 700)


def tune_gc() -> None:
    """Collect the young generation less often.

    A server allocates and frees a few hundred objects per message; CPython's default (a young
    collection every 700 net allocations) then runs several collections per request, each
    walking every young object. Reference counting frees nearly all of them anyway: the cycle
    collector only has to run now and then. (The older generations keep their defaults.)
    """
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def tune_process() -> None:
    """Everything above, as every process the ``atoll`` command starts does (and benchmarks)."""
    tune_malloc()
    tune_gc()
