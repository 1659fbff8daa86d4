"""A small plain-PyTorch LocalTrainer: least-squares regression on per-client synthetic data.

It is what a user plugging their own PyTorch code into UnitedLLM writes, and it keeps the
round-loop tests fast (no Hugging Face model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from unitedllm.optimizers.client_hook import LocalCorrection
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent

DIM = 8


class LinearTrainer(LocalTrainer):
    """Fits ``y = x @ w`` by SGD; client ``rank`` sees data from its own true ``w`` (non-IID)."""

    def __init__(
        self,
        rank: int,
        *,
        seed: int = 0,
        samples: int | None = None,
        lr: float = 0.05,
        poison: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        self.rank = rank
        self.seed = seed
        self.lr = lr
        self.poison = poison
        gen = torch.Generator().manual_seed(1000 + rank)
        self.n = samples if samples is not None else 16 * (rank + 1)
        true_w = torch.ones(DIM) + 0.5 * rank
        self.x = torch.randn(self.n, DIM, generator=gen)
        self.y = self.x @ true_w
        self.fits: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.evals = 0

    def initial_weights(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {"linear.weight": torch.randn(DIM, generator=gen), "linear.bias": torch.zeros(1)}

    def base_fingerprint(self) -> str:
        return hashlib.sha256(b"linear-%d" % DIM).hexdigest()

    def _loss(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pred = self.x @ w["linear.weight"] + w["linear.bias"]
        return ((pred - self.y) ** 2).mean()

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: object = None,  # never given: this trainer applies no client-side correction
    ) -> FitResult:
        w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
        steps = max(1, max_steps)
        loss = torch.tensor(0.0)
        for step in range(steps):
            loss = self._loss(w)
            grads = torch.autograd.grad(loss, list(w.values()))
            with torch.no_grad():
                for t, g in zip(w.values(), grads, strict=True):
                    t -= self.lr * g
            if on_step is not None:
                on_step(StepEvent(self.rank, round_idx, step + 1, steps, float(loss)))
        out = {k: v.detach() for k, v in w.items()}
        if self.poison is not None:
            out = self.poison(out)
        self.fits.append((round_idx, {k: v.clone() for k, v in out.items()}))
        return FitResult(out, self.n, {"train_loss": float(loss.detach())})

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        self.evals += 1
        with torch.no_grad():
            loss = float(self._loss(weights))
        return EvalResult({"eval_loss": loss}, self.n)

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))


class CorrectingLinearTrainer(LinearTrainer):
    """The linear trainer with FedProx/SCAFFOLD support, as a user would add it: one call before each step."""

    applies_corrections = True

    def fit(  # type: ignore[override]
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: LocalCorrection | None = None,
    ) -> FitResult:
        w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
        loss = torch.tensor(0.0)
        for _ in range(max(1, max_steps)):
            for t in w.values():
                t.grad = None
            loss = self._loss(w)
            loss.backward()
            if correction is not None:
                correction.apply(w, self.lr)
            with torch.no_grad():
                for t in w.values():
                    t -= self.lr * t.grad  # type: ignore[operator]
        out = {k: v.detach().clone() for k, v in w.items()}
        self.fits.append((round_idx, out))
        return FitResult(out, self.n, {"train_loss": float(loss.detach())})
