"""Continuous batching: rows that decode together, joined by new requests at any token boundary.

A :class:`DecodingBatch` holds the rows generating on one adapter: their KV cache, attention mask,
next position and next input token. :meth:`~DecodingBatch.admit` prefills newcomers on their own
(their prompts left-padded to each other), picks their first token, then merges them in: the shorter
of the two caches is padded on the left with masked zeros up to the other's length and the rows are
stacked, each keeping its own positions, so a row's attention sees exactly its own tokens whatever
it shares the batch with. :meth:`~DecodingBatch.step` feeds every row its last token and picks the
next; rows whose client left, whose deadline passed or which finished leave the batch at once, and
cache columns that no remaining row attends to are cut from the left, so a batch that never empties
does not grow without bound. Each row samples with its own settings and generator (greedy rows are
deterministic, seeded rows reproducible).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from unitedllm.serving.batching import Job
from unitedllm.serving.decoding import TextAssembler
from unitedllm.serving.engine import Chunk
from unitedllm.serving.errors import Overloaded

__all__ = ["DecodingBatch"]


class DecodingBatch:
    """The rows decoding together on one model (adapter already selected), grown and shrunk per token."""

    def __init__(
        self,
        model: Any,
        *,
        tokenizer: Any,
        device: str,
        cache_kw: str,
        timeout_s: float,
        closing: threading.Event,
        on_cancelled: Callable[[], None] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.cache_kw = cache_kw
        self.timeout_s = timeout_s
        self.closing = closing
        self.on_cancelled = on_cancelled
        self.rows: list[Job] = []
        self.generated = 0  # tokens handed to clients, all rows together
        self._cache: Any = None
        self._mask: Any = None  # [rows, cached tokens]: 1 where a row attends
        self._positions: Any = None  # [rows]: the position of each row's next input token
        self._tokens: Any = None  # [rows]: each row's next input token

    @property
    def can_join(self) -> bool:
        """Whether rows can join mid-decode: the cache is one the batch can pad and stack (full attention)."""
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # transformers before 4.56 keeps its cache in other shapes: no joining
            return self._cache is None
        layers = getattr(self._cache, "layers", None)
        return self._cache is None or (
            isinstance(layers, list) and all(type(layer) is DynamicLayer for layer in layers)
        )

    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs``, give each its first token, and add those still going to the batch."""
        import torch

        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[i, width - n :] = torch.tensor(job.prompt_ids)
            mask[i, width - n :] = 1
            job.state = _RowState(job, tok)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = getattr(out, self.cache_kw)
        tokens = _choose(out.logits[:, -1, :].float(), jobs)
        keep = self._advance(jobs, tokens)
        if not keep:
            return
        if len(keep) < len(jobs):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask, tokens = mask[index], tokens[index]
            jobs = [jobs[i] for i in keep]
        next_positions = mask.sum(-1)
        if not self.rows:
            self.rows, self._cache, self._mask = jobs, cache, mask
            self._positions, self._tokens = next_positions, tokens
            return
        self._stack(jobs, cache, mask, next_positions, tokens)

    def step(self) -> None:
        """One token for every row; finished and abandoned rows leave."""
        import torch

        if self.closing.is_set():
            for job in self.rows:
                job.emit(Overloaded("the server is shutting down"))
            self.rows = []
            return
        mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(
            input_ids=self._tokens[:, None],
            attention_mask=mask,
            position_ids=self._positions[:, None],
            use_cache=True,
            **{self.cache_kw: self._cache},
        )
        self._mask, self._positions = mask, self._positions + 1
        tokens = _choose(out.logits[:, -1, :].float(), self.rows)
        keep = self._advance(self.rows, tokens)
        if not keep:
            self.rows = []
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.device)
            self._cache.batch_select_indices(index)
            self._mask, self._positions, tokens = self._mask[index], self._positions[index], tokens[index]
            self.rows = [self.rows[i] for i in keep]
            self._trim()
        self._tokens = tokens

    def _advance(self, rows: list[Job], tokens: Any) -> list[int]:
        """Hand each row its new token; the indices of the rows that go on."""
        keep: list[int] = []
        for i, job in enumerate(rows):
            if job.cancelled.is_set():
                if self.on_cancelled is not None:
                    self.on_cancelled()
                continue
            if job.fail_if_expired(self.timeout_s):
                continue
            self.generated += 1
            state: _RowState = job.state
            delta = state.text.push(int(tokens[i]))
            done = state.text.finish_reason is not None
            if delta or done:
                job.emit(state.chunk(delta))
            if not done:
                keep.append(i)
        return keep

    def _stack(self, jobs: list[Job], cache: Any, mask: Any, positions: Any, tokens: Any) -> None:
        """Add prefilled rows below the batch's, the shorter cache padded on the left (masked)."""
        import torch

        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)], dim=0)
        self._positions = torch.cat([self._positions, positions])
        self._tokens = torch.cat([self._tokens, tokens])
        self.rows = self.rows + jobs

    def _trim(self) -> None:
        """Cut the cache columns on the left that no row attends to (they belonged to rows that left)."""
        first = int(self._mask.any(dim=0).int().argmax())
        if first == 0 or not self.can_join:
            return
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]


def _pad_left(tensor: Any, width: int) -> Any:
    """``tensor`` with zeros before its sequence dimension's start, up to ``width`` (mask: dim 1 of 2; KV: dim -2)."""
    import torch

    dim = 1 if tensor.dim() == 2 else tensor.dim() - 2
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _RowState:
    """A row's text so far and its random generator."""

    def __init__(self, job: Job, tokenizer: Any):
        import torch

        params = job.params
        self.job = job
        self.text = TextAssembler(
            lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
            eos_token_id=tokenizer.eos_token_id,
            stop=params.stop,
            max_tokens=params.max_tokens,
        )
        self.generator: Any = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def chunk(self, delta: str) -> Chunk:
        return Chunk(
            text=delta,
            finish_reason=self.text.finish_reason,
            prompt_tokens=len(self.job.prompt_ids),
            completion_tokens=self.text.completion_tokens,
            model=self.job.model,
        )


def _choose(logits: Any, rows: list[Job]) -> Any:
    """The next token of every row: argmax for greedy rows, else temperature + top-p sampling."""
    import torch

    tokens = logits.argmax(dim=-1).cpu()
    for i, job in enumerate(rows):
        params = job.params
        if params.greedy:
            continue
        probs = torch.softmax(logits[i].cpu() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        tokens[i] = torch.multinomial(probs, 1, generator=job.state.generator)[0]
    return tokens.to(logits.device)
