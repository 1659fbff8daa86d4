"""Exact, order-independent streaming sums: how aggregation stays deterministic in O(1) memory.

Client updates arrive in any order, and floating-point addition is not associative, so a
plain running sum gives different bytes for different arrival orders. Instead of
buffering updates to sum them in rank order, :class:`ExactSum` keeps the *exact* value of
Σ w_k·x_k per element, as an unevaluated sum of float64 "levels" (a floating-point
expansion). Every addition is error-free (TwoSum, Knuth/Møller): the rounding error of
adding into level 0 is carried into level 1, and so on. The result is the exact sum,
rounded once, so it is the same whatever the order or grouping of the additions.

Why this is cheap: with integer weights (sample counts) below 2**29, w·x is exact in
float64 for float32/bfloat16/float16 values, and per element the sum of such products
almost always fits in two doubles (hi, lo); a third level is allocated only when, at one
coordinate, clients' values differ by more than ~2**50 in magnitude (in practice only
for adversarial updates). Memory is 16 bytes per parameter, whatever the number of
clients. float64 updates are accepted too (the product error is carried exactly with
Dekker's TwoProduct).

The inner loop has a compiled kernel (:mod:`unitedllm.optimizers._native`) that does the
same arithmetic in one pass; the torch path here is the reference and the fallback, and
both give identical bytes.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from unitedllm.optimizers import _native

__all__ = ["MAX_WEIGHT", "ExactSum", "count_nonfinite", "exact_weighted_sum"]

# w * x is exact in float64 when w has at most 29 significant bits and x at most 24.
MAX_WEIGHT = 2**29

_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="exact-sum")
    return _pool


def _native_dtype(dtype: torch.dtype) -> int | None:
    if dtype == torch.float32:
        return _native.DTYPE_F32
    if dtype == torch.bfloat16:
        return _native.DTYPE_BF16
    return None


def count_nonfinite(x: torch.Tensor) -> int:
    """How many elements of ``x`` are inf or NaN (one read pass)."""
    k = _native.kernels()
    code = _native_dtype(x.dtype)
    if k is not None and code is not None and x.device.type == "cpu":
        flat = x.detach().contiguous().view(-1)
        return int(k.count_nonfinite(flat.data_ptr(), flat.numel(), code))
    return int((~torch.isfinite(x.detach())).sum())


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = a + b
    z = t - a
    return t, (a - (t - z)) + (b - z)


def _two_product(a: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """p, e with p + e == a * w exactly (Dekker; no FMA needed)."""
    split = 134217729.0  # 2**27 + 1
    p = a * w
    c = a * split
    a_hi = c - (c - a)
    a_lo = a - a_hi
    cw = w * split
    w_hi = cw - (cw - w)
    w_lo = w - w_hi
    e = ((a_hi * w_hi - p) + a_hi * w_lo + a_lo * w_hi) + a_lo * w_lo
    return p, e


class ExactSum:
    """The exact value of Σ w_k·x_k over one tensor's elements, added in any order."""

    def __init__(self, shape: torch.Size | Sequence[int]):
        self.shape = torch.Size(shape)
        self.numel = self.shape.numel()
        self.levels: list[torch.Tensor] = [torch.zeros(self.numel, dtype=torch.float64)]

    def add(self, xs: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        """Add w·x for each pair; several at once is faster (one pass over the accumulator)."""
        if len(xs) != len(weights):
            raise ValueError("add() needs one weight per tensor")
        native: list[tuple[torch.Tensor, int, float]] = []
        for x, w in zip(xs, weights, strict=True):
            if x.shape != self.shape:
                raise ValueError(f"shape {tuple(x.shape)} does not match the accumulator's {tuple(self.shape)}")
            w = float(w)
            if x.dtype != torch.float64 and not (w.is_integer() and abs(w) <= MAX_WEIGHT):
                raise ValueError(f"weight {w} must be an integer of magnitude <= 2**29 for exact sums")
            x = x.detach()
            if x.dtype == torch.float16:
                x = x.float()  # exact; the kernel reads float32 and bfloat16 only
            code = _native_dtype(x.dtype)
            if code is not None and x.device.type == "cpu" and _native.kernels() is not None:
                native.append((x.contiguous().view(-1), code, w))
            else:
                self._add_torch(x.reshape(-1), w)
        if native:
            self._add_native(native)

    def _add_torch(self, x: torch.Tensor, w: float) -> None:
        x = x.to(device="cpu")
        if x.dtype == torch.float64:
            terms = list(_two_product(x, w))
        else:
            terms = [x.to(torch.float64).mul_(w)]  # exact, see MAX_WEIGHT
        for e in terms:
            level = 0
            while True:
                if level == len(self.levels):
                    self.levels.append(torch.zeros(self.numel, dtype=torch.float64))
                t, r = _two_sum(self.levels[level], e)
                self.levels[level].copy_(t)
                if not bool(r.any()):
                    break
                e, level = r, level + 1

    def _add_native(self, inputs: list[tuple[torch.Tensor, int, float]]) -> None:
        k = _native.kernels()
        assert k is not None
        while len(self.levels) < 2:  # the kernel always works on (hi, lo)
            self.levels.append(torch.zeros(self.numel, dtype=torch.float64))
        nx = len(inputs)
        xs = (ctypes.c_void_p * nx)(*[x.data_ptr() for x, _, _ in inputs])
        codes = (ctypes.c_int32 * nx)(*[c for _, c, _ in inputs])
        ws = (ctypes.c_double * nx)(*[w for _, _, w in inputs])
        # Split into one contiguous range per thread, aligned to the kernel's block size.
        nthreads = max(1, min(torch.get_num_threads(), self.numel // (64 * _native.BLOCK)))
        step = -(-self.numel // nthreads // _native.BLOCK) * _native.BLOCK or _native.BLOCK
        pending = [(s, min(s + step, self.numel)) for s in range(0, self.numel, step)]
        while pending:
            levels = (ctypes.c_void_p * len(self.levels))(*[lv.data_ptr() for lv in self.levels])
            nlev = len(self.levels)

            def run(rng: tuple[int, int]) -> int:
                return int(k.exact_add(levels, nlev, rng[0], rng[1], xs, codes, ws, nx))

            if len(pending) == 1:
                stops = [run(pending[0])]
            else:
                stops = list(_threads().map(run, pending))
            if any(s == -2 for s in stops):
                raise RuntimeError("exact-sum kernel called with fewer than two levels")
            if any(s < 0 for s in stops):
                raise MemoryError("exact-sum kernel could not allocate its block buffer")
            pending = [(s, end) for s, (_, end) in zip(stops, pending, strict=True) if s < end]
            if pending:  # a block needed a deeper level: it was rolled back, add one and resume
                self.levels.append(torch.zeros(self.numel, dtype=torch.float64))

    def result(self, *, consume: bool = False) -> torch.Tensor:
        """The exact sum rounded once to float64; ``consume=True`` reuses the accumulator's memory."""
        if len(self.levels) == 1:
            out = self.levels[0] if consume else self.levels[0].clone()
            return out.view(self.shape)
        deep: list[int] = []
        cols: list[list[float]] = []
        if len(self.levels) > 2:  # gather before level 0 may be overwritten below
            idx = torch.stack(self.levels[2:]).ne(0).any(dim=0).nonzero().view(-1)
            deep = idx.tolist()
            cols = torch.stack([lv[idx] for lv in self.levels]).T.tolist()
        # Correctly rounded where deeper levels are 0.
        out = self.levels[0].add_(self.levels[1]) if consume else self.levels[0] + self.levels[1]
        for i, parts in zip(deep, cols, strict=True):
            out[i] = math.fsum(parts)  # correctly rounded sum of the element's levels
        if consume:
            self.levels = []
        return out.view(self.shape)


def exact_weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_k·x_k computed exactly and rounded once to float64; independent of the order of ``xs``."""
    if not xs:
        raise ValueError("nothing to sum")
    acc = ExactSum(xs[0].shape)
    acc.add(xs, weights)
    return acc.result()


def native_enabled() -> bool:
    """Whether the compiled kernel is in use (False with UNITEDLLM_NO_NATIVE=1 or no compiler)."""
    return not os.environ.get("UNITEDLLM_NO_NATIVE") and _native.kernels() is not None
