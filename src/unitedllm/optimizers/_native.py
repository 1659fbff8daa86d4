"""Optional compiled kernels for exact summation, built on first use with the system C compiler.

The kernels only make :mod:`unitedllm.optimizers.exact_sum` faster: they run the very
same error-free arithmetic as its pure-torch path, so results are bit-identical with or
without them. Without a C compiler, or with ``UNITEDLLM_NO_NATIVE=1``, nothing is built
and the torch path is used.

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
from pathlib import Path

__all__ = ["BLOCK", "DTYPE_BF16", "DTYPE_F32", "kernels"]

log = logging.getLogger(__name__)

BLOCK = 256
DTYPE_F32 = 0
DTYPE_BF16 = 1

# Error-free transformations must not be "optimised": no -ffast-math, no FMA contraction.
_CFLAGS = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256

static inline double bf16_to_double(uint16_t v) {
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return (double)f;
}

/* Add residual e into levels 2..nlev-1 at element i with TwoSum; 1 if a deeper level is needed. */
static inline int cascade(double **lev, int nlev, int64_t i, double e) {
    for (int l = 2; l < nlev; l++) {
        double a = lev[l][i];
        double t = a + e;
        double z = t - a;
        double r = (a - (t - z)) + (e - z);
        lev[l][i] = t;
        if (r == 0.0) return 0;
        e = r;
    }
    return 1;
}

/* Branch-free (vectorisable) TwoSum into levels 0 and 1; what level 1 cannot hold goes to ebuf. */
#define TWOSUM_LOOP(LOAD)                                              \
    for (int64_t j = 0; j < n; j++) {                                  \
        double p = w * (LOAD);                                         \
        double a = h[j];                                               \
        double t = a + p;                                              \
        double z = t - a;                                              \
        double e = (a - (t - z)) + (p - z);                            \
        h[j] = t;                                                      \
        double b = lo[j];                                              \
        double t2 = b + e;                                             \
        double z2 = t2 - b;                                            \
        double e2 = (b - (t2 - z2)) + (e - z2);                        \
        lo[j] = t2;                                                    \
        ebuf[j] = e2;                                                  \
        any |= (e2 != 0.0);                                            \
    }

/* Add w[k] * x[k][i] for every input k and i in [start, end) exactly into the levels.
 * Returns end on success, or the start of the block where a deeper level was needed; that
 * block is rolled back first, so the caller can add a level and resume from there. */
int64_t ul_exact_add(double **lev, int nlev, int64_t start, int64_t end,
                     const void **xs, const int32_t *dtypes, const double *ws, int nx) {
    double ebuf[BLOCK];
    if (nlev < 2) return -2;  /* the caller always provides levels 0 and 1 */
    double *snap = (double *)malloc(sizeof(double) * BLOCK * (size_t)nlev);
    if (!snap) return -1;
    for (int64_t b = start; b < end; b += BLOCK) {
        int64_t n = end - b < BLOCK ? end - b : BLOCK;
        for (int l = 0; l < nlev; l++) memcpy(snap + (size_t)l * BLOCK, lev[l] + b, sizeof(double) * n);
        int fail = 0;
        for (int k = 0; k < nx && !fail; k++) {
            double *h = lev[0] + b;
            double *lo = lev[1] + b;
            double w = ws[k];
            int any = 0;
            if (dtypes[k] == 0) {
                const float *x = (const float *)xs[k] + b;
                TWOSUM_LOOP((double)x[j])
            } else {
                const uint16_t *x = (const uint16_t *)xs[k] + b;
                TWOSUM_LOOP(bf16_to_double(x[j]))
            }
            if (any) {
                for (int64_t j = 0; j < n; j++) {
                    if (ebuf[j] != 0.0 && cascade(lev, nlev, b + j, ebuf[j])) { fail = 1; break; }
                }
            }
        }
        if (fail) {
            for (int l = 0; l < nlev; l++) memcpy(lev[l] + b, snap + (size_t)l * BLOCK, sizeof(double) * n);
            free(snap);
            return b;
        }
    }
    free(snap);
    return end;
}

/* Number of non-finite values (exponent bits all ones) among n values of the given dtype. */
int64_t ul_count_nonfinite(const void *x, int64_t n, int32_t dtype) {
    int64_t bad = 0;
    if (dtype == 0) {
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t i = 0; i < n; i++) bad += (u[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *u = (const uint16_t *)x;
        for (int64_t i = 0; i < n; i++) bad += (u[i] & 0x7f80u) == 0x7f80u;
    }
    return bad;
}
"""


class Kernels:
    """ctypes bindings of the compiled kernels."""

    def __init__(self, lib: ctypes.CDLL):
        self.exact_add = lib.ul_exact_add
        self.exact_add.restype = ctypes.c_int64
        self.exact_add.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int32),
            ctypes.POINTER(ctypes.c_double),
            ctypes.c_int,
        ]
        self.count_nonfinite = lib.ul_count_nonfinite
        self.count_nonfinite.restype = ctypes.c_int64
        self.count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]


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
            proc = subprocess.run([compiler, *_CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("compiling the exact-sum kernel failed; using the torch path: %s", proc.stderr[-2000:])
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
