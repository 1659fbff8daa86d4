"""Optional compiled kernels for exact summation, built on first use with the system C compiler.

The kernels only make :mod:`unitedllm.optimizers.exact_sum` faster: they compute the same
exact sums as its pure-torch path (error-free TwoSum into float64 levels), rounded once,
so results are bit-identical with or without them. They are faster because they fold
several updates per pass over the accumulator, touch the second level only in the rare
blocks that need it, and split the work over threads. Without a C compiler, or with
``UNITEDLLM_NO_NATIVE=1``, nothing is built and the torch path is used.

The shared library is cached under ``$XDG_CACHE_HOME/unitedllm/kernels`` keyed by the
source, the compiler and the CPU's feature flags (it is built with ``-march=native``, so a
cache shared between different machines must not hand one CPU's build to another).
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
_CFLAGS = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define PREFETCH_AHEAD 8192  /* elements; see prefetch_ahead */

/* Every worker claims chunks [c, c + chunk) of [.., end) from *next, which all the
 * workers of one call share, until none is left; chunks are multiples of BLOCK. */
#define FOR_EACH_CHUNK(C, STOP)                                                 \
    for (int64_t C, STOP; (C = __atomic_fetch_add(next, chunk, __ATOMIC_RELAXED)) < end \
         && ((STOP = C + chunk < end ? C + chunk : end), 1);)

static inline double bf16_to_double(uint16_t v) {
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return (double)f;
}

/* TwoSum e into levels from..nlev-1 at element i; what the last level cannot hold is returned (0 if none). */
static inline double cascade(double **lev, int from, int nlev, int64_t i, double e) {
    for (int l = from; l < nlev; l++) {
        double a = lev[l][i];
        double t = a + e;
        double z = t - a;
        double r = (a - (t - z)) + (e - z);
        lev[l][i] = t;
        if (r == 0.0) return 0.0;
        e = r;
    }
    return e;
}

/* Branch-free (vectorisable) TwoSum of each term into acc[j]; the rounding errors go to ebuf. */
#define TWOSUM_INTO(ACC, TERM)                                         \
    for (int64_t j = 0; j < n; j++) {                                  \
        double p = (TERM);                                             \
        double a = (ACC)[j];                                           \
        double t = a + p;                                              \
        double z = t - a;                                              \
        double e = (a - (t - z)) + (p - z);                            \
        (ACC)[j] = t;                                                  \
        ebuf[j] = e;                                                   \
        uint64_t bits; memcpy(&bits, &e, 8);                           \
        any |= bits << 1; /* all but the sign: -0.0 counts as 0 */     \
    }

/* What one exact_add call folds in; every worker of the call shares it. */
typedef struct {
    double **lev;            /* the levels, nlev >= 2 */
    int32_t nlev;
    int32_t nx;              /* inputs, at most 64 */
    const void **xs;         /* input k: nx float32 or bfloat16 arrays */
    const int32_t *dtypes;
    const double *ws;        /* input k is added times ws[k] */
    uint8_t *lo_used;        /* per block: level 1 holds something there */
    const uint64_t *skip;    /* per block: bit k set = leave input k out there (NULL: none) */
    uint64_t *nonfinite;     /* per block: bit k set = input k has inf/NaN there and was left
                                out (NULL: no check) */
    int32_t fresh;           /* level 0 holds garbage: input 0 is stored into it, not added */
    int32_t late_check;      /* with nonfinite: check inputs other than a stored first one only
                                in blocks that leave a rounding error (inf and NaN always do), after
                                adding them; such a block's sum is spoilt, so the caller must throw
                                the whole sum away when any input is found non-finite */
} fold_args;

static inline int block_finite(const void *x, int32_t dtype, int64_t b, int64_t n) {
    uint32_t bad = 0;
    if (dtype == 0) {
        const uint32_t *u = (const uint32_t *)x + b;
        for (int64_t j = 0; j < n; j++) bad |= (u[j] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *u = (const uint16_t *)x + b;
        for (int64_t j = 0; j < n; j++) bad |= (u[j] & 0x7f80u) == 0x7f80u;
    }
    return !bad;
}

/* Asks for the block PREFETCH_AHEAD elements further along input k, past the chunk's end
 * too: there it is the same input's part of a chunk folded soon after. The hardware
 * prefetchers alone fall behind the arithmetic; this doubled the throughput where measured
 * (bench/README.md), more than prefetching the next input's part of this chunk did.
 * Prefetches never fault, so reading ahead of an input's end is harmless. */
static inline void prefetch_ahead(const fold_args *a, int k, int64_t b) {
    int64_t size = a->dtypes[k] == 0 ? 4 : 2;
    uintptr_t p = (uintptr_t)a->xs[k] + (uintptr_t)((b + PREFETCH_AHEAD) * size);
    for (int64_t off = 0; off < BLOCK * size; off += 64) __builtin_prefetch((const void *)(p + off));
}

/* Adds input k into one block; lo (level 1) is read only when level 0 leaves an error.
 * Returns how many values even the deepest level could not hold (put in ovf_idx/ovf_val);
 * sets *deep when something went to level 2 or deeper. */
static int64_t add_input_block(const fold_args *a, int k, int64_t b, int64_t n, int64_t *ovf_idx, double *ovf_val,
                               int *deep) {
    double ebuf[BLOCK];
    double *h = a->lev[0] + b;
    int64_t blk = b / BLOCK, novf = 0;
    int store = a->fresh && k == 0;
    int late = a->late_check && !store;
    if (late && a->nonfinite[blk]) return 0;  /* spoilt already: the caller throws the sum away */
    int skipped = a->skip && (a->skip[blk] >> k & 1);
    int bad = !skipped && a->nonfinite && !late && !block_finite(a->xs[k], a->dtypes[k], b, n);
    if (skipped || bad) {
        if (bad) a->nonfinite[blk] |= 1ull << k;
        if (store) memset(h, 0, sizeof(double) * n);
        return 0;
    }
    double w = a->ws[k];
    if (store) {  /* w * x is exact: nothing for level 1 */
        if (a->dtypes[k] == 0) {
            const float *x = (const float *)a->xs[k] + b;
            for (int64_t j = 0; j < n; j++) h[j] = w * (double)x[j];
        } else {
            const uint16_t *x = (const uint16_t *)a->xs[k] + b;
            for (int64_t j = 0; j < n; j++) h[j] = w * bf16_to_double(x[j]);
        }
        return 0;
    }
    uint64_t any = 0;
    if (a->dtypes[k] == 0) {
        const float *x = (const float *)a->xs[k] + b;
        TWOSUM_INTO(h, w * (double)x[j])
    } else {
        const uint16_t *x = (const uint16_t *)a->xs[k] + b;
        TWOSUM_INTO(h, w * bf16_to_double(x[j]))
    }
    if (!any) return 0;
    if (late && !block_finite(a->xs[k], a->dtypes[k], b, n)) {
        a->nonfinite[blk] |= 1ull << k;
        return 0;
    }
    a->lo_used[blk] = 1;
    double *lo = a->lev[1] + b;
    any = 0;
    TWOSUM_INTO(lo, ebuf[j])
    if (!any) return 0;
    *deep = 1;
    for (int64_t j = 0; j < n; j++) {
        if (ebuf[j] == 0.0) continue;
        double left = cascade(a->lev, 2, a->nlev, b + j, ebuf[j]);
        if (left != 0.0) { ovf_idx[novf] = b + j; ovf_val[novf] = left; novf++; }
    }
    return novf;
}

/* Folds the inputs into the chunk [c, stop) one input at a time, starting with input k0 at
 * block b0: the chunk's accumulator stays in cache while every input streams through it
 * once, so memory traffic is the inputs plus one write of the chunk however many inputs
 * there are. After a block that overflowed it stops and puts where to go on in resume[0..3]
 * (chunk start, chunk stop, input, block; input == nx: the chunk is done). */
static int64_t fold_chunk(const fold_args *a, int64_t c, int64_t stop, int32_t k0, int64_t b0,
                          int64_t *ovf_idx, double *ovf_val, int64_t *resume, int *deep) {
    for (int k = k0; k < a->nx; k++) {
        for (int64_t b = k == k0 ? b0 : c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            prefetch_ahead(a, k, b);
            int64_t novf = add_input_block(a, k, b, n, ovf_idx, ovf_val, deep);
            if (novf) {
                int next_k = b + n < stop ? k : k + 1;
                resume[0] = c; resume[1] = stop; resume[2] = next_k; resume[3] = b + n < stop ? b + n : c;
                return novf;
            }
        }
    }
    return 0;
}

int64_t ul_fold_chunk(const fold_args *a, int64_t c, int64_t stop, int32_t k0, int64_t b0,
                      int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    int deep = 0;
    return fold_chunk(a, c, stop, k0, b0, ovf_idx, ovf_val, resume, &deep);
}

/* Worker adding ws[k] * xs[k][i] exactly into the levels for i < end, chunk by chunk. What
 * even the deepest level cannot hold goes to the overflow buffers (room for BLOCK values);
 * the worker then stops, with where to go on in resume[0..3] (see ul_fold_chunk), and
 * returns the number of overflow values (0 when it found no more work). */
int64_t ul_exact_add(const fold_args *a, int64_t end, int64_t chunk, int64_t *next,
                     int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    FOR_EACH_CHUNK(c, stop) {
        int64_t novf = ul_fold_chunk(a, c, stop, 0, c, ovf_idx, ovf_val, resume);
        if (novf) return novf;
    }
    return 0;
}

/* Adds val[j] at element idx[j] into levels from..nlev-1; what is left over is moved to the
 * front of idx/val and counted in the return value. */
int64_t ul_deposit(double **lev, int from, int nlev, int64_t *idx, double *val, int64_t n) {
    int64_t left = 0;
    for (int64_t j = 0; j < n; j++) {
        double r = cascade(lev, from, nlev, idx[j], val[j]);
        if (r != 0.0) { idx[left] = idx[j]; val[left] = r; left++; }
    }
    return left;
}

/* Worker: out[i] = (hi[i] + lo[i]) / divisor, reading lo only in blocks where it was used. */
void ul_finish(const double *hi, const double *lo, const uint8_t *lo_used, double divisor, double *out,
               int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            const double *h = hi + b, *l = lo + b;
            double *o = out + b;
            if (lo_used[b / BLOCK]) {
                for (int64_t j = 0; j < n; j++) o[j] = (h[j] + l[j]) / divisor;
            } else {
                for (int64_t j = 0; j < n; j++) o[j] = h[j] / divisor;
            }
        }
    }
}

/* Worker: out[i] = (float)((double)w[i] + scale * ((hi[i] + lo[i]) / divisor)), the same
 * roundings as ul_finish, then times scale (skipped when it is 1), then ul_apply_f32, in
 * one pass: a float32 model plus a scaled mean, without the float64 mean in memory. */
static inline void finish_apply_block(const double *h, const double *l, int used, double divisor, double scale,
                                      const float *x, float *o, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        double m = (used ? h[j] + l[j] : h[j]) / divisor;
        if (scale != 1.0) m = m * scale;
        o[j] = (float)((double)x[j] + m);
    }
}

void ul_finish_apply_f32(const double *hi, const double *lo, const uint8_t *lo_used, double divisor,
                         double scale, const float *w, float *out, int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            finish_apply_block(hi + b, lo + b, lo_used[b / BLOCK], divisor, scale, w + b, out + b, n);
        }
    }
}

#define MAX_LEVELS 64  /* float64 levels never need more than ~40 (2098 exponents / 53 bits) */

/* Worker for a whole round of a plain mean step in one pass: every input is folded into this
 * thread's scratch chunk (level 0 of elements [c, stop) at scratch[0 .. stop - c)), then
 * out = (float)(w + scale * ((hi + lo) / divisor)) is written for the chunk while it is in
 * cache (ul_finish_apply_f32's roundings). Level 0 never reaches memory, so the pass moves
 * the inputs, w and out, and nothing else. A chunk whose fold reached level 2 spills: its
 * scratch is copied to the real level 0, it is left unfinished and its start is listed in
 * spilled[] (the caller finishes it once its deep elements are known). An overflow spills
 * its chunk too and stops the worker as in ul_exact_add (the caller goes on from the real
 * level 0). */
int64_t ul_fold_finish_f32(const fold_args *a, double *scratch, double divisor, double scale, const float *w,
                           float *out, int64_t end, int64_t chunk, int64_t *next, int64_t *spilled,
                           int64_t *nspilled, int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    double *lev[MAX_LEVELS];
    fold_args t = *a;  /* this thread's: its own level 0 */
    if (a->nlev > MAX_LEVELS) return -1;
    for (int l = 0; l < a->nlev; l++) lev[l] = a->lev[l];
    t.lev = lev;
    t.fresh = 1;
    FOR_EACH_CHUNK(c, stop) {
        lev[0] = (double *)((uintptr_t)scratch - (uintptr_t)c * sizeof(double));  /* lev[0][i] = scratch[i - c] */
        int deep = 0;
        int64_t novf = fold_chunk(&t, c, stop, 0, c, ovf_idx, ovf_val, resume, &deep);
        if (deep) {  /* an overflow always went through level 2 first */
            memcpy(a->lev[0] + c, scratch, sizeof(double) * (stop - c));
            spilled[(*nspilled)++] = c;
            if (novf) return novf;
            continue;
        }
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            finish_apply_block(scratch + (b - c), a->lev[1] + b, a->lo_used[b / BLOCK], divisor, scale, w + b,
                               out + b, n);
        }
    }
    return 0;
}

/* Worker: out[i] = (float)((double)w[i] + step[i]), the float32 model plus a float64 step. */
void ul_apply_f32(const float *w, const double *step, float *out, int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t i = c; i < stop; i++) out[i] = (float)((double)w[i] + step[i]);
    }
}

/* Worker: the number of non-finite values (exponent bits all ones) among x[0..end). */
int64_t ul_count_nonfinite(const void *x, int32_t dtype, int64_t end, int64_t chunk, int64_t *next) {
    int64_t bad = 0;
    FOR_EACH_CHUNK(c, stop) {
        if (dtype == 0) {
            const uint32_t *u = (const uint32_t *)x;
            for (int64_t i = c; i < stop; i++) bad += (u[i] & 0x7f800000u) == 0x7f800000u;
        } else {
            const uint16_t *u = (const uint16_t *)x;
            for (int64_t i = c; i < stop; i++) bad += (u[i] & 0x7f80u) == 0x7f80u;
        }
    }
    return bad;
}
"""


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


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Kernels | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found; exact summation uses the torch path")
        return None
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_CFLAGS, platform.machine(), _cpu_flags()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitedllm" / "kernels"
    lib_path = cache / f"exact_sum-{key.hexdigest()[:16]}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "exact_sum.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "exact_sum.so"
            proc = subprocess.run(
                [compiler, *_CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True, check=False
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
                _loaded = _build()
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
