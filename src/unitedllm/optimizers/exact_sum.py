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
almost always fits in level 0 alone: level 1 is needed only where clients' values at one
coordinate differ by more than ~2**(53 - 24 - bits of the weight), and a third level only
beyond ~2**50 (in practice only for adversarial updates). Levels are zero pages until
written, so memory is 8 bytes per parameter plus the blocks that really need more,
whatever the number of clients. float64 updates are accepted too (the product error is
carried exactly with Dekker's TwoProduct).

The inner loop has compiled kernels (:mod:`unitedllm.optimizers._native`) that fold
several updates per pass and split the tensor over threads; the torch path here is the
reference and the fallback. Both compute the exact sum, so both give identical bytes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import operator
import os
from collections.abc import Callable, Sequence

import torch

from unitedllm.optimizers import _native
from unitedllm.optimizers._memory import empty, empty_like, zeros_f64

__all__ = [
    "MAX_WEIGHT",
    "ExactSum",
    "NonFiniteInputs",
    "count_nonfinite",
    "mean_step_one_pass",
]

# w * x is exact in float64 when w has at most 29 significant bits and x at most 24.
MAX_WEIGHT = 2**29

# Inputs the kernel folds per pass over the accumulator. It takes them one at a time per
# cache-sized chunk of the accumulator, so a pass reads each input once and writes the
# accumulator once however many there are (bench/README.md).
FOLD = _native.MAX_INPUTS


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
        ptr, numel = flat.data_ptr(), flat.numel()
        counts, _ = _native.run_parallel(
            lambda _t, nxt: int(k.count_nonfinite(ptr, code, numel, _native.CHUNK, nxt)), 0, numel
        )
        return sum(counts)
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


def _summand(x: torch.Tensor, weight: float, shape: torch.Size) -> tuple[torch.Tensor, float, int | None]:
    """``x`` and ``weight`` checked for an exact sum of ``shape``: x detached (float16 widened,
    exactly), the weight as a float, and x's kernel dtype code (None: the torch path only)."""
    if x.shape != shape:
        raise ValueError(f"shape {tuple(x.shape)} does not match the sum's {tuple(shape)}")
    weight = float(weight)
    if x.dtype != torch.float64 and not (weight.is_integer() and abs(weight) <= MAX_WEIGHT):
        raise ValueError(f"weight {weight} must be an integer of magnitude <= 2**29 for exact sums")
    x = x.detach()
    if x.dtype == torch.float16:
        x = x.float()  # exact; the kernel reads float32 and bfloat16 only
    code = _native_dtype(x.dtype)
    if code is None or x.device.type != "cpu" or _native.kernels() is None:
        return x, weight, None
    return x, weight, code


def _flagged(nonfinite: torch.Tensor, count: int) -> list[int]:
    """Which of ``count`` inputs the kernel's per-block non-finite bit masks name."""
    seen = functools.reduce(operator.or_, nonfinite[nonfinite != 0].tolist(), 0)
    return [k for k in range(count) if seen >> k & 1]


Resume = tuple[int, int, int, int]  # chunk start, chunk stop, input, block (see ul_fold_chunk)


def _where(resume: ctypes.Array[ctypes.c_int64]) -> Resume:
    """A kernel's resume[0..3] as a Python tuple."""
    return resume[0], resume[1], resume[2], resume[3]


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


# inf - inf is NaN, and NaN never rounds away: without this, each level would pass it on.
_POISONED = "inf or NaN reached the exact sum: add inputs that may hold them with check_finite=True"


def _overflow_room() -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers for the values one block of one input can pass beyond the deepest level."""
    return torch.empty(_native.BLOCK, dtype=torch.int64), torch.empty(_native.BLOCK, dtype=torch.float64)


Progress = tuple[int, torch.Tensor, torch.Tensor, Resume, list[int]]
"""What a worker leaves: overflow count and values, where to go on, and chunks it left unfinished."""


def _fold_worker(k: _native.Kernels, args: _native.FoldArgs, end: int, _thread: int, nxt: int) -> Progress:
    """One thread's share of an exact_add call."""
    idx, val = _overflow_room()
    resume = (ctypes.c_int64 * 4)()
    n = int(k.exact_add(ctypes.byref(args), end, _native.CHUNK, nxt, idx.data_ptr(), val.data_ptr(), resume))
    return n, idx, val, _where(resume), []


class NonFiniteInputs(ValueError):
    """Inputs of a one-pass mean step hold inf or NaN; nothing was returned (retry without them)."""

    def __init__(self, positions: list[int]):
        super().__init__(f"inputs at positions {positions} hold inf or NaN")
        self.positions = positions


class ExactSum:
    """The exact value of Σ w_k·x_k over one tensor's elements, added in any order.

    ``levels[0]`` and ``levels[1]`` always exist (level 1 is zero pages until needed);
    deeper levels are added when some element needs them.
    """

    def __init__(self, shape: torch.Size | Sequence[int]):
        self.shape = torch.Size(shape)
        self.numel = self.shape.numel()
        # Level 0 comes from the buffers earlier rounds left (no page faults) and holds their
        # garbage until the first fold stores into it; the others are zero pages.
        self.levels: list[torch.Tensor] = [empty(self.numel, torch.float64), zeros_f64(self.numel)]
        self._fresh = True
        # One flag per kernel block: level 1 holds something there (the torch path sets all).
        self._lo_used = torch.zeros(-(-self.numel // _native.BLOCK), dtype=torch.uint8)

    def add(
        self, xs: Sequence[torch.Tensor], weights: Sequence[float], *, check_finite: bool = False
    ) -> list[int]:
        """Add w·x for each pair; several at once is faster (one pass over the accumulator).

        With ``check_finite``, an input holding inf or NaN is left out entirely (the sum is
        as if it had never been added) and its position in ``xs`` is returned; checking
        while adding costs no extra pass over the input. Without it the caller vouches that
        every value is finite.
        """
        if len(xs) != len(weights):
            raise ValueError("add() needs one weight per tensor")
        refused: list[int] = []
        native: list[tuple[int, torch.Tensor, int, float]] = []
        for pos, (x_in, w_in) in enumerate(zip(xs, weights, strict=True)):
            x, w, code = _summand(x_in, w_in, self.shape)
            if code is not None:
                native.append((pos, x.contiguous().view(-1), code, w))
            elif check_finite and count_nonfinite(x):
                refused.append(pos)
            else:
                self._add_torch(x.reshape(-1), w)
        for g in range(0, len(native), FOLD):
            refused += self._add_native(native[g : g + FOLD], check_finite)
        return sorted(refused)

    def _add_torch(self, x: torch.Tensor, w: float) -> None:
        self._clear_fresh()
        x = x.to(device="cpu")
        if x.dtype == torch.float64:
            terms = list(_two_product(x, w))
        else:
            terms = [x.to(torch.float64).mul_(w)]  # exact, see MAX_WEIGHT
        for e in terms:
            level = 0
            while True:
                if level == len(self.levels):
                    self.levels.append(zeros_f64(self.numel))
                if level == 1:
                    self._lo_used.fill_(1)
                t, r = _two_sum(self.levels[level], e)
                self.levels[level].copy_(t)
                if not bool(r.any()):
                    break
                if level >= 1 and not bool(r.isfinite().all()):
                    raise ValueError(_POISONED)
                e, level = r, level + 1

    def _add_native(
        self, inputs: list[tuple[int, torch.Tensor, int, float]], check_finite: bool
    ) -> list[int]:
        """Fold a few inputs in one pass; positions of those refused for inf/NaN."""
        nonfinite = torch.zeros(self._lo_used.numel(), dtype=torch.int64) if check_finite else None
        self._fold([(x, c, w) for _, x, c, w in inputs], skip=None, nonfinite=nonfinite)
        if nonfinite is None or not bool(nonfinite.any()):
            return []
        bad = _flagged(nonfinite, len(inputs))
        # Take back what the refused inputs added in the blocks where they were finite: the
        # sum is exact, so adding -w·x restores it exactly.
        skip = torch.zeros_like(nonfinite)
        for j, k in enumerate(bad):
            skip |= nonfinite.bitwise_right_shift(k).bitwise_and_(1).bitwise_left_shift_(j)
        self._fold([(inputs[k][1], inputs[k][2], -inputs[k][3]) for k in bad], skip=skip, nonfinite=None)
        return [inputs[k][0] for k in bad]

    def _fold(
        self,
        inputs: list[tuple[torch.Tensor, int, float]],
        *,
        skip: torch.Tensor | None,
        nonfinite: torch.Tensor | None,
    ) -> None:
        k = _native.kernels()
        assert k is not None
        args, _alive = self._fold_args(inputs, skip=skip, nonfinite=nonfinite)
        args.fresh, self._fresh = self._fresh, False
        self._drive(k, args, len(inputs), lambda end: functools.partial(_fold_worker, k, args, end))

    def _fold_args(
        self,
        inputs: list[tuple[torch.Tensor, int, float]],
        *,
        skip: torch.Tensor | None,
        nonfinite: torch.Tensor | None,
    ) -> tuple[_native.FoldArgs, tuple[object, ...]]:
        """The kernel's description of a fold, and the ctypes arrays it points into (keep them alive)."""
        assert len(inputs) <= _native.MAX_INPUTS
        nx = len(inputs)
        xs = _pointers([x for x, _, _ in inputs])
        codes = (ctypes.c_int32 * nx)(*[c for _, c, _ in inputs])
        ws = (ctypes.c_double * nx)(*[w for _, _, w in inputs])
        args = _native.FoldArgs(
            nx=nx,
            xs=ctypes.addressof(xs),
            dtypes=ctypes.addressof(codes),
            ws=ctypes.addressof(ws),
            lo_used=self._lo_used.data_ptr(),
            skip=None if skip is None else skip.data_ptr(),
            nonfinite=None if nonfinite is None else nonfinite.data_ptr(),
        )
        return args, (xs, codes, ws)

    def _drive(
        self,
        k: _native.Kernels,
        args: _native.FoldArgs,
        nx: int,
        worker: Callable[[int], Callable[[int, int], Progress]],
    ) -> list[int]:
        """Run ``worker(end)`` on every thread over [0, numel); returns the chunks left unfinished.

        A worker that passes a value beyond the deepest level stops; the levels are deepened
        and its chunk is folded to the end here, on this thread (through level 0 in memory).
        """
        ranges = [(0, self.numel)]  # left to claim chunk by chunk, on every thread
        partial: list[Resume] = []  # chunks a worker stopped in for an overflow, finished on this thread
        unfinished: list[int] = []
        while ranges or partial:
            levels = _pointers(self.levels)  # alive while the kernels run
            args.lev, args.nlev = ctypes.addressof(levels), len(self.levels)
            if partial:
                c, stop, first, block = partial.pop()
                if first < nx:
                    idx, val = _overflow_room()
                    resume = (ctypes.c_int64 * 4)()
                    ptrs = idx.data_ptr(), val.data_ptr(), resume
                    n = int(k.fold_chunk(ctypes.byref(args), c, stop, first, block, *ptrs))
                    if n:
                        self._deepen(idx[:n], val[:n])
                        partial.append(_where(resume))
                continue
            start, end = ranges.pop()
            results, reached = _native.run_parallel(worker(end), start, end)
            if reached < end:  # every worker stopped for an overflow before the counter ran out
                ranges.append((reached, end))
            for n, idx, val, where, spilled in results:
                unfinished += spilled
                if n < 0:
                    raise RuntimeError(
                        f"the exact sum needs more than the kernel's levels ({len(self.levels)})"
                    )
                if n:
                    self._deepen(idx[:n], val[:n])
                    partial.append(where)
        return unfinished

    def _clear_fresh(self) -> None:
        """Zero level 0 if no fold has stored into it yet."""
        if self._fresh:
            self.levels[0].zero_()
            self._fresh = False

    def _deepen(self, idx: torch.Tensor, val: torch.Tensor) -> None:
        """Add values that every existing level already passed on into new, deeper levels."""
        k = _native.kernels()
        assert k is not None
        if not bool(val.isfinite().all()):
            raise ValueError(_POISONED)
        n = idx.numel()
        while n:
            self.levels.append(zeros_f64(self.numel))
            nlev = len(self.levels)
            n = int(k.deposit(_pointers(self.levels), nlev - 1, nlev, idx.data_ptr(), val.data_ptr(), n))

    def _deep_elements(self) -> tuple[list[int], list[list[float]]]:
        """Elements with something beyond level 1: their indices and every level's value there."""
        if len(self.levels) <= 2:
            return [], []
        deeper = self.levels[2] != 0
        for lv in self.levels[3:]:
            deeper |= lv != 0
        idx = deeper.nonzero().view(-1)
        return idx.tolist(), torch.stack([lv[idx] for lv in self.levels]).T.tolist()

    def result(self, *, consume: bool = False, divide_by: float = 1) -> torch.Tensor:
        """The exact sum rounded once to float64, then divided by ``divide_by``.

        ``consume=True`` reuses the accumulator's memory for the result.
        """
        self._clear_fresh()
        hi, lo = self.levels[0], self.levels[1]
        deep, cols = self._deep_elements()  # before level 0 may be overwritten below
        out = hi if consume else empty_like(hi)
        k = _native.kernels()
        if k is not None:
            # fl(hi + lo) is the correctly rounded sum where the deeper levels are 0.
            ptrs = (hi.data_ptr(), lo.data_ptr(), self._lo_used.data_ptr(), float(divide_by), out.data_ptr())
            _native.run_parallel(
                lambda _t, nxt: k.finish(*ptrs, self.numel, _native.CHUNK, nxt), 0, self.numel
            )
        else:
            torch.add(hi, lo, out=out)
            if divide_by != 1:
                out.div_(divide_by)
        for i, parts in zip(deep, cols, strict=True):
            out[i] = math.fsum(parts) / divide_by  # correctly rounded sum of the element's levels
        if consume:
            self.levels = []
        return out.view(self.shape)

    def plus_mean(self, w: torch.Tensor, *, divide_by: float, scale: float = 1.0) -> torch.Tensor | None:
        """``w + scale·(sum / divide_by)`` as float32, in one pass, consuming the sum; None where unsupported.

        The same bytes as ``(w.double() + scale * result(divide_by=divide_by)).float()`` (the
        multiplication left out when ``scale`` is 1), without the float64 result in memory.
        Needs the compiled kernel and a contiguous float32 CPU ``w`` of the sum's shape;
        otherwise returns None and leaves the sum as it was.
        """
        k = _native.kernels()
        if k is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.shape != self.shape:
            return None
        w = w.contiguous()
        self._clear_fresh()
        deep, cols = self._deep_elements()
        out = empty_like(w)
        ptrs = (
            self.levels[0].data_ptr(), self.levels[1].data_ptr(), self._lo_used.data_ptr(),
            float(divide_by), float(scale), w.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        _native.run_parallel(
            lambda _t, nxt: k.finish_apply_f32(*ptrs, self.numel, _native.CHUNK, nxt), 0, self.numel
        )
        _fix_deep(out, w, deep, cols, divide_by=divide_by, scale=scale)
        self.levels = []
        return out


def _fix_deep(
    out: torch.Tensor,
    w: torch.Tensor,
    deep: list[int],
    cols: list[list[float]],
    *,
    divide_by: float,
    scale: float,
) -> None:
    """``out[i] = w[i] + scale·(exact sum / divide_by)`` where the kernel saw only levels 0 and 1."""
    flat_w, flat_out = w.reshape(-1), out.view(-1)
    for i, parts in zip(deep, cols, strict=True):
        mean = math.fsum(parts) / divide_by  # correctly rounded sum of the element's levels
        flat_out[i] = float(flat_w[i]) + (mean * scale if scale != 1.0 else mean)


def mean_step_one_pass(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    w: torch.Tensor,
    *,
    divide_by: float,
    scale: float = 1.0,
) -> torch.Tensor | None:
    """``w + scale·(Σ weights_k·xs_k / divide_by)`` as float32, every input read once: a whole round.

    The same bytes as folding the inputs into an :class:`ExactSum` and calling
    :meth:`ExactSum.plus_mean`, but the sum never reaches memory: each thread folds every
    input into one cache-sized chunk of its own and writes that chunk's result at once, so
    the pass moves the inputs, ``w`` and the result, nothing else (chunks whose sums need a
    third level are finished afterwards from memory). Returns None where unsupported (no
    compiled kernel, ``w`` not float32 on the CPU, an input neither float32, bfloat16 nor
    float16 on the CPU, more than 64 inputs). Raises :class:`NonFiniteInputs` when inputs
    hold inf or NaN, found while folding: call again without them.
    """
    k = _native.kernels()
    if (
        k is None
        or w.dtype != torch.float32
        or w.device.type != "cpu"
        or not 0 < len(xs) <= _native.MAX_INPUTS
    ):
        return None
    inputs: list[tuple[torch.Tensor, int, float]] = []
    for x_in, weight_in in zip(xs, weights, strict=True):
        x, weight, code = _summand(x_in, weight_in, w.shape)
        if code is None:
            return None
        inputs.append((x.contiguous().view(-1), code, weight))
    acc = ExactSum(w.shape)
    acc._fresh = False  # level 0 in memory is written only where a chunk spills, by a copy
    w = w.contiguous()
    out = empty_like(w)
    nonfinite = torch.zeros(acc._lo_used.numel(), dtype=torch.int64)
    args, _alive = acc._fold_args(inputs, skip=None, nonfinite=nonfinite)
    args.late_check = 1  # found after adding, in blocks that leave an error: the sum is thrown away then
    chunks = -(-acc.numel // _native.CHUNK)
    ptrs = float(divide_by), float(scale), w.data_ptr(), out.data_ptr()

    def worker(end: int) -> Callable[[int, int], Progress]:
        def run(_thread: int, nxt: int) -> Progress:
            scratch = torch.empty(_native.CHUNK, dtype=torch.float64)
            spilled = torch.empty(chunks, dtype=torch.int64)
            nspilled = ctypes.c_int64(0)
            idx, val = _overflow_room()
            resume = (ctypes.c_int64 * 4)()
            n = int(
                k.fold_finish_f32(
                    ctypes.byref(args), scratch.data_ptr(), *ptrs, end, _native.CHUNK, nxt,
                    spilled.data_ptr(), ctypes.byref(nspilled), idx.data_ptr(), val.data_ptr(), resume,
                )
            )  # fmt: skip
            return n, idx, val, _where(resume), spilled[: nspilled.value].tolist()

        return run

    unfinished = acc._drive(k, args, len(inputs), worker)
    if bool(nonfinite.any()):
        raise NonFiniteInputs(_flagged(nonfinite, len(inputs)))
    hi, lo = acc.levels[0].data_ptr(), acc.levels[1].data_ptr()
    for c in unfinished:  # their level 0 is in memory: finish them from there
        counter = ctypes.c_int64(c)
        stop = min(c + _native.CHUNK, acc.numel)
        k.finish_apply_f32(
            hi, lo, acc._lo_used.data_ptr(), *ptrs, stop, _native.CHUNK, ctypes.addressof(counter)
        )
    deep, cols = acc._deep_elements()
    _fix_deep(out, w, deep, cols, divide_by=divide_by, scale=scale)
    return out


def native_enabled() -> bool:
    """Whether the compiled kernel is in use (False with UNITEDLLM_NO_NATIVE=1 or no compiler)."""
    return not os.environ.get("UNITEDLLM_NO_NATIVE") and _native.kernels() is not None
