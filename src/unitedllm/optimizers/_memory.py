"""Model-sized buffers that are cheap to create: huge pages where Linux allows, zero pages until written.

A fresh buffer of 4 KiB pages costs one page fault per page on first write, which on a
virtual machine is slower than a pass over the data; asking for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, honoured when ``/sys/kernel/mm/transparent_hugepage/enabled``
is ``always`` or ``madvise``) makes it 512 times fewer faults. Elsewhere these are plain
torch allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Any

import torch

__all__ = ["empty_like", "zeros_f64"]

# Below this a buffer cannot hold a huge page, and a mapping of its own is not worth it.
_LARGE_BYTES = 1 << 21
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PAGE = mmap.PAGESIZE


def _madvise() -> Any:
    if sys.platform != "linux" or _MADV_HUGEPAGE is None:
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def zeros_f64(numel: int, *, dense: bool = True) -> torch.Tensor:
    """float64 zeros whose memory is committed only where (and when) it is written.

    ``dense=True`` (most of it will be written) asks for huge pages; ``dense=False`` (a
    few scattered writes) keeps 4 KiB pages, so a write commits 4 KiB, not 2 MiB.
    """
    if numel * 8 < _LARGE_BYTES:
        return torch.zeros(numel, dtype=torch.float64)
    buf = mmap.mmap(-1, numel * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = _MADV_HUGEPAGE if dense else getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        buf.madvise(advice)
    return torch.frombuffer(buf, dtype=torch.float64)  # the tensor keeps the mapping alive


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` (contiguous), backed by huge pages where possible."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    nbytes = out.numel() * out.element_size()
    if _madvise_fn is not None and out.device.type == "cpu" and nbytes >= _LARGE_BYTES:
        start = -(-out.data_ptr() // _PAGE) * _PAGE
        stop = (out.data_ptr() + nbytes) // _PAGE * _PAGE
        _madvise_fn(start, stop - start, _MADV_HUGEPAGE)  # a hint: failure only costs speed
    return out
