"""The transformers engine: one base model in memory, PEFT adapters switched per batch, dynamic batching.

A worker thread owns the model. It takes a batch of queued jobs that use the same adapter
(:class:`~unitedllm.serving.batching.BatchQueue`), left-pads their prompts and decodes them together
token by token with a KV cache; each row samples with its own settings and generator (greedy rows
are deterministic, seeded rows reproducible). Between tokens it drops rows whose client went away,
whose deadline passed or which finished, shrinking the cache, and stops when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

from unitedllm.serving.adapters import ModelEntry, ModelRegistry
from unitedllm.serving.batching import BatchQueue, Job
from unitedllm.serving.decoding import TextAssembler
from unitedllm.serving.engine import BatchObserver, Chunk, Engine, Generation, SamplingParams
from unitedllm.serving.errors import AdapterRefused, GenerationFailed, Overloaded, ServingError
from unitedllm.serving.layout import ADAPTER_WEIGHTS, is_model_dir

__all__ = ["TransformersEngine"]

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    """Serves a registry's models with transformers + PEFT on the CPU (or one GPU)."""

    name = "transformers"

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        timeout_s: float = 300.0,
        device: str | None = None,
        observer: BatchObserver | None = None,
    ):
        super().__init__(registry)
        self.queue = BatchQueue(max_batch=max_batch, max_queue=max_queue, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.observer = observer
        self._device = device
        self._model: Any = None  # the base, wrapped as a PeftModel once an adapter is loaded
        self._peft: Any = None
        self._tokenizer: Any = None
        self._max_positions: int | None = None
        self._loaded: dict[str, str] = {}  # entry name -> PEFT adapter name
        # Tensor shapes of the first checkpoint loaded from the run: every round must match them.
        # Named adapters may differ (another rank, other targets); PEFT checks they fit the base.
        self._run_shapes: dict[str, tuple[int, ...]] = {}
        self._closing = threading.Event()
        self._model_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._cache_kw = "past_key_values"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load_base)
        await self.load(self.registry.default())
        self._worker = threading.Thread(target=self._work, name="unitedllm-generate", daemon=True)
        self._worker.start()

    async def close(self) -> None:
        self._closing.set()  # the running batch stops at its next token
        self.queue.close()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
            self._worker = None

    def queue_depth(self) -> int:
        return len(self.queue)

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = self.registry.base_dir
        if not is_model_dir(base):
            raise ServingError(f"{base} holds no model yet (no config.json with weights)")
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        default = self.registry.default().path
        tokenizer_dir = (
            default if default is not None and (default / "tokenizer_config.json").is_file() else base
        )
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServingError(f"cannot load the base model from {base}: {first_line}") from exc
        model = model.to(device)
        model.eval()
        self._model = model
        self._device = device
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        # transformers 5 names the KV cache ``cache`` (``past_key_values`` before, deprecated since).
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    # -- adapters ----------------------------------------------------------------------------

    async def load(self, entry: ModelEntry) -> None:
        if entry.path is None or entry.name in self._loaded:
            return
        await asyncio.to_thread(self._load_adapter, entry)

    def _load_adapter(self, entry: ModelEntry) -> None:
        assert entry.path is not None
        with self._model_lock:
            if entry.name in self._loaded:
                return
            digest = self._check(entry)
            adapter = f"adapter_{len(self._loaded)}"
            try:
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(self._model, str(entry.path), adapter_name=adapter)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(str(entry.path), adapter_name=adapter)
            except (RuntimeError, ValueError, KeyError, OSError) as exc:
                raise AdapterRefused(str(entry.path), f"it does not fit the base model: {exc}") from exc
            if _digest(entry.path / ADAPTER_WEIGHTS) != digest:
                self._peft.delete_adapter(adapter)
                raise AdapterRefused(str(entry.path), "its weights changed while loading")
            entry.digest = digest
            self._loaded[entry.name] = adapter
            log.info("loaded %s from %s (sha256 %s)", entry.name, entry.path, digest[:12])

    def _check(self, entry: ModelEntry) -> str:
        """Digest, shapes and finiteness of an adapter's tensors, before the model sees them."""
        import torch
        from safetensors.torch import load as load_safetensors

        assert entry.path is not None
        where = str(entry.path)
        try:
            data = (entry.path / ADAPTER_WEIGHTS).read_bytes()
        except OSError as exc:
            raise AdapterRefused(where, f"cannot read {ADAPTER_WEIGHTS}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if entry.digest is not None and entry.digest != digest:
            raise AdapterRefused(
                where,
                f"{ADAPTER_WEIGHTS} has sha256 {digest}, not the recorded {entry.digest} (changed since written)",
            )
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
            raise AdapterRefused(where, f"{ADAPTER_WEIGHTS} is damaged: {exc}") from exc
        if entry.round is not None:
            self._check_shapes(where, {name: tuple(t.shape) for name, t in tensors.items()})
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterRefused(where, f"{name} holds NaN or infinite values")
        if entry.round is not None and not self._run_shapes:
            self._run_shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        return digest

    def _check_shapes(self, where: str, shapes: dict[str, tuple[int, ...]]) -> None:
        if not self._run_shapes:
            return
        if set(shapes) != set(self._run_shapes):
            raise AdapterRefused(where, "its tensor names differ from the run's other checkpoints")
        wrong = [n for n, s in shapes.items() if s != self._run_shapes[n]]
        if wrong:
            raise AdapterRefused(
                where, f"{wrong[0]} has shape {shapes[wrong[0]]}, not {self._run_shapes[wrong[0]]}"
            )

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, entry: ModelEntry, prompt: str, params: SamplingParams) -> Generation:
        await self.load(entry)
        ids = list(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            ids = [self._tokenizer.bos_token_id if self._tokenizer.bos_token_id is not None else 0]
        if self._max_positions is not None and len(ids) + params.max_tokens > self._max_positions:
            raise ServingError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self._max_positions} tokens",
                param="max_tokens",
            )
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

        def emit(item: Chunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        job = Job(
            adapter=self._loaded.get(entry.name) if entry.path is not None else None,
            prompt_ids=ids,
            params=params,
            emit=emit,
            deadline=time.monotonic() + self.timeout_s,
            model=entry.name,
        )
        self.queue.submit(job)
        # A client that goes away cancels: its row stops at the next token.
        return Generation(inbox, job.cancelled.set)

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self.queue.next_batch()) is not None:
            started = time.perf_counter()
            try:
                with self._model_lock:
                    tokens = self._run(batch)
            except Exception as exc:  # the server must outlive one bad batch; the clients get the reason
                log.exception("generation failed")
                for job in batch:
                    job.emit(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            if self.observer is not None:
                self.observer(len(batch), tokens, time.perf_counter() - started)

    def _run(self, batch: list[Job]) -> int:
        import torch

        adapter = batch[0].adapter
        switch: Any = contextlib.nullcontext()
        if self._peft is not None:
            if adapter is None:
                switch = self._peft.disable_adapter()
            else:
                self._peft.set_adapter(adapter)
        model = self._peft if self._peft is not None else self._model
        with torch.inference_mode(), switch:
            return self._decode(model, batch)

    def _decode(self, model: Any, batch: list[Job]) -> int:
        import torch

        rows = [job for job in batch if not job.cancelled.is_set()]
        if not rows:
            return 0
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(job.prompt_ids) for job in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, job in enumerate(rows):
            n = len(job.prompt_ids)
            ids[i, width - n :] = torch.tensor(job.prompt_ids)
            mask[i, width - n :] = 1
            job.state = _RowState(job, tok)
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = getattr(out, self._cache_kw)
        generated = 0
        while True:
            tokens = _choose(out.logits[:, -1, :].float(), rows)
            keep: list[int] = []
            if self._closing.is_set():
                for job in rows:
                    job.emit(Overloaded("the server is shutting down"))
                return generated
            for i, job in enumerate(rows):
                if job.cancelled.is_set():
                    if self.on_cancelled is not None:
                        self.on_cancelled()
                    continue
                if job.fail_if_expired(self.timeout_s):
                    continue
                generated += 1
                state: _RowState = job.state
                delta = state.text.push(int(tokens[i]))
                done = state.text.finish_reason is not None
                if delta or done:
                    job.emit(state.chunk(delta))
                if not done:
                    keep.append(i)
            if not keep:
                return generated
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self._device)
                cache.batch_select_indices(index)
                tokens, mask, positions = tokens[index], mask[index], positions[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
            )


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
