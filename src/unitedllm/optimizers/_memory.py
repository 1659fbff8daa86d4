"""Model-sized buffers for aggregation that are cheap to get: reused across rounds, huge pages, lazy zeros.

Every round needs a model-sized accumulator and a model-sized result. Fresh memory costs
a page fault per page on first write, which on a virtual machine is slower than a pass
over the data (hundreds of milliseconds for 800 MB). So large buffers are anonymous
mappings that are handed out as tensors and kept: once no tensor uses one any more (the
tensor, its views and its storage are gone), the next request of that size gets it back,
already faulted in. The pool never holds more free buffers of a size than were once in use
at the same time, so it does not grow past the high-water mark of the rounds themselves.

Dense buffers ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``, honoured when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``): 512 times
fewer faults. Sparse ones (:func:`zeros_f64`) stay on 4 KiB pages and are not reused, so a
scattered write commits 4 KiB, not 2 MiB. Small buffers are plain torch allocations.
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections import defaultdict

import torch

__all__ = ["empty", "empty_like", "zeros_f64"]

# Below this a buffer cannot hold a huge page, and a mapping of its own is not worth it.
_LARGE_BYTES = 1 << 21


def _mapping(nbytes: int, advice: int | None) -> mmap.mmap:
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if advice is not None:
        buf.madvise(advice)
    return buf


class _Pool:
    """Dense mappings handed out as tensors, taken back once no tensor uses them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, list[mmap.mmap]] = defaultdict(list)
        self._peak: dict[int, int] = defaultdict(int)  # most of a size in use at once

    @staticmethod
    def _in_use(maps: list[mmap.mmap], i: int) -> bool:
        # A tensor made by torch.frombuffer holds a reference to the mapping until its
        # storage is freed; the pool's list and getrefcount's argument are the other two.
        return sys.getrefcount(maps[i]) > 2

    def take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            maps = self._maps[nbytes]
            free = [i for i in range(len(maps)) if not self._in_use(maps, i)]
            if free:
                buf = maps[free.pop()]
            else:
                buf = _mapping(nbytes, getattr(mmap, "MADV_HUGEPAGE", None))
                maps.append(buf)
            in_use = len(maps) - len(free)
            self._peak[nbytes] = max(self._peak[nbytes], in_use)
            for i in sorted(free[self._peak[nbytes] :], reverse=True):  # more spare than ever needed
                maps.pop(i).close()
            return buf


_pool = _Pool()


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-d tensor whose contents are undefined (a large one may hold an earlier round's values)."""
    nbytes = numel * dtype.itemsize
    if nbytes < _LARGE_BYTES:
        return torch.empty(numel, dtype=dtype)
    return torch.frombuffer(_pool.take(nbytes), dtype=dtype)  # the tensor keeps the mapping alive


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor shaped like ``t``, contents undefined."""
    return empty(t.numel(), t.dtype).view(t.shape)


def zeros_f64(numel: int) -> torch.Tensor:
    """float64 zeros for sparse use: memory is committed 4 KiB at a time, where written."""
    if numel * 8 < _LARGE_BYTES:
        return torch.zeros(numel, dtype=torch.float64)
    buf = _mapping(numel * 8, getattr(mmap, "MADV_NOHUGEPAGE", None))
    return torch.frombuffer(buf, dtype=torch.float64)
