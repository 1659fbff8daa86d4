"""Optional compiled kernels for exact summation, built on first use with the system C compiler.

The kernels only make :mod:`unitedllm.optimizers.exact_sum` faster: they compute the same
exact sums as its pure-torch path (error-free TwoSum into float64 levels), rounded once,
so results are bit-identical with or without them. They are faster because they fold
several updates per pass over the accumulator, touch the second level only in the rare
blocks that need it, and split the work over threads. Without a C compiler, or with
``UNITEDLLM_NO_NATIVE=1``, nothing is built and the torch path is used.

The C source is ``exact_sum.c`` beside this module. It is built portably: for the highest
x86-64 micro-architecture level this CPU supports (``x86-64-v4``/``v3``/``v2``, else the
baseline; other machines get their baseline), never ``-march=native``, and the shared library
is cached under ``$XDG_CACHE_HOME/unitedllm/kernels`` keyed by the source, the compiler, the
flags and that level. A cache shared between machines therefore only ever hands a library to
a CPU that has every feature it was built for. The results do not depend on the level: the
error-free transformations are built without fast-math or FMA contraction.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["BLOCK", "CHUNK", "DTYPE_BF16", "DTYPE_F32", "MAX_INPUTS", "FoldArgs", "kernels", "run_parallel"]

log = logging.getLogger(__name__)

R = TypeVar("R")

BLOCK = 512  # elements per block; must match the C source
DTYPE_F32 = 0
DTYPE_BF16 = 1
MAX_INPUTS = 64  # inputs per exact_add call (one bit each in the per-block masks)

# Error-free transformations must not be "optimised": no -ffast-math, no FMA contraction.
_CFLAGS = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]

# x86-64 micro-architecture levels (the psABI's), highest first, with the CPU flags each needs
# (as Linux's /proc/cpuinfo names them).
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
)

_SOURCE_FILE = "exact_sum.c"  # shipped beside this module as package data


def _source() -> str:
    """The kernels' C source."""
    return resources.files(__package__).joinpath(_SOURCE_FILE).read_text(encoding="utf-8")


class FoldArgs(ctypes.Structure):
    """``fold_args`` of the C source: what one ``exact_add`` call folds in."""

    _fields_ = [
        ("lev", ctypes.c_void_p),
        ("nlev", ctypes.c_int32),
        ("nx", ctypes.c_int32),
        ("xs", ctypes.c_void_p),
        ("dtypes", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("lo_used", ctypes.c_void_p),
        ("skip", ctypes.c_void_p),
        ("nonfinite", ctypes.c_void_p),
        ("fresh", ctypes.c_int32),
        ("late_check", ctypes.c_int32),
    ]


class Kernels:
    """ctypes bindings of the compiled kernels.

    The ``*_worker``-style functions (exact_add, finish, finish_apply_f32, apply_f32, count_nonfinite) take
    ``end, chunk, next``: several threads may call one at once with the same ``next``
    counter, and each claims chunks of ``chunk`` elements until none is left.
    """

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
        work = [i64, i64, p]  # end, chunk, next
        self.exact_add = self._bind(lib.ul_exact_add, i64, [ctypes.POINTER(FoldArgs), *work, p, p, p])
        self.fold_chunk = self._bind(
            lib.ul_fold_chunk, i64, [ctypes.POINTER(FoldArgs), i64, i64, i32, i64, p, p, p]
        )
        self.deposit = self._bind(lib.ul_deposit, i64, [p, ctypes.c_int, ctypes.c_int, p, p, i64])
        self.finish = self._bind(lib.ul_finish, None, [p, p, p, f64, p, *work])
        self.apply_f32 = self._bind(lib.ul_apply_f32, None, [p, p, p, *work])
        self.finish_apply_f32 = self._bind(lib.ul_finish_apply_f32, None, [p, p, p, f64, f64, p, p, *work])
        self.fold_finish_f32 = self._bind(
            lib.ul_fold_finish_f32, i64, [ctypes.POINTER(FoldArgs), p, f64, f64, p, p, *work, p, p, p, p, p]
        )
        self.count_nonfinite = self._bind(lib.ul_count_nonfinite, i64, [p, i32, *work])

    @staticmethod
    def _bind(fn: Any, restype: Any, argtypes: list[Any]) -> Any:
        fn.restype = restype
        fn.argtypes = argtypes
        return fn


_lock = threading.Lock()
_loaded: Kernels | None = None
_tried = False


def _cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux names them (empty where /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def isa_level(machine: str, flags: Collection[str]) -> str | None:
    """The ``-march`` level to build for: the highest x86-64 level ``flags`` cover (None: the baseline)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return None
    have = set(flags)
    for i, (name, _) in enumerate(_X86_LEVELS):
        # A level needs its own features and every lower level's.
        if all(need <= have for _, need in _X86_LEVELS[i:]):
            return name
    return "x86-64"


def build_flags(level: str | None) -> list[str]:
    """The compiler flags for ``level`` (``-march=<level>``; nothing extra for the baseline)."""
    return [*_CFLAGS, f"-march={level}"] if level else list(_CFLAGS)


def _build(level: str | None = None, *, cache: Path | None = None) -> Kernels | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found; exact summation uses the torch path")
        return None
    source = _source()
    flags = build_flags(level)
    key = hashlib.sha256("\0".join([source, compiler, *flags, platform.machine()]).encode())
    cache = (
        cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitedllm" / "kernels"
    )
    lib_path = cache / f"exact_sum-{level or 'baseline'}-{key.hexdigest()[:16]}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / _SOURCE_FILE
            src.write_text(source, encoding="utf-8")
            out = Path(tmp) / "exact_sum.so"
            proc = subprocess.run(
                [compiler, *flags, "-o", str(out), str(src)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                log.warning(
                    "compiling the exact-sum kernel failed; using the torch path: %s", proc.stderr[-2000:]
                )
                return None
            os.replace(out, lib_path)  # atomic: concurrent builders never see a half-written library
    return Kernels(ctypes.CDLL(str(lib_path)))


def kernels() -> Kernels | None:
    """The compiled kernels, building them on first call; None when unavailable or disabled."""
    global _loaded, _tried
    if os.environ.get("UNITEDLLM_NO_NATIVE"):
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _loaded = _build(isa_level(platform.machine(), _cpu_flags()))
            except OSError as exc:  # read-only cache, missing loader, ...
                log.warning("exact-sum kernel unavailable (%s); using the torch path", exc)
                _loaded = None
        return _loaded


# Elements a worker claims at a time, and the size below which one thread does it all.
CHUNK = 128 * BLOCK
_PARALLEL_MIN = 4 * CHUNK

_pool: ThreadPoolExecutor | None = None


def _forget_workers() -> None:
    global _pool
    _pool = None  # a forked child has the pool but not its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="exact-sum"
            )
        return _pool


def run_parallel(work: Callable[[int, int], R], start: int, end: int) -> tuple[list[R], int]:
    """Run ``work(thread_index, next)`` on up to ``torch.get_num_threads()`` threads, this one included.

    ``next`` is the address of an int64 counter, first ``start``, from which the kernels
    claim chunks of :data:`CHUNK` elements below ``end``; dynamic claiming keeps every
    thread busy even when another process slows one of them down. Returns each thread's
    result and the counter's final value (below ``end`` only if every worker stopped early).
    """
    import torch

    counter = ctypes.c_int64(start)
    nxt = ctypes.addressof(counter)
    size = end - start
    nthreads = min(torch.get_num_threads(), -(-size // CHUNK)) if size >= _PARALLEL_MIN else 1
    if nthreads <= 1:
        return [work(0, nxt)], counter.value
    futures = [_workers().submit(work, t, nxt) for t in range(1, nthreads)]
    try:
        first = work(0, nxt)
    finally:
        others = [f.result() for f in futures]  # the counter must outlive every worker
    return [first, *others], counter.value
