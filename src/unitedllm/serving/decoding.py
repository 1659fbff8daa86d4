"""Turn generated token ids into text deltas: incremental detokenization and stop strings.

Text is decoded from all the tokens so far (a BPE piece may change how its neighbours decode);
a delta holds back a trailing replacement character (an incomplete UTF-8 sequence) and any tail
that could still grow into a stop string, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextAssembler"]


class TextAssembler:
    """One choice's text as tokens arrive; :meth:`push` returns the new text and a finish reason."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        eos_token_id: int | None,
        stop: Sequence[str] = (),
        max_tokens: int,
    ):
        self._decode = decode
        self._eos = eos_token_id
        self._stop = tuple(s for s in stop if s)
        self._max_tokens = max_tokens
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0
        self.finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def push(self, token: int) -> str:
        """Add one generated token; returns the text to send now (possibly empty)."""
        if self.finish_reason is not None:
            return ""
        self.ids.append(token)
        if token == self._eos:
            self.finish_reason = "stop"
            return self._flush()
        text = self._decode(self.ids if self._eos is None else [t for t in self.ids if t != self._eos])
        cut = self._first_stop(text)
        if cut is not None:
            self.text = text[:cut]
            self.finish_reason = "stop"
            return self._flush()
        self.text = text
        if len(self.ids) >= self._max_tokens:
            self.finish_reason = "length"
            return self._flush()
        return self._release(self._safe_end(text))

    def _first_stop(self, text: str) -> int | None:
        # A stop string may only start in text the client has not been sent yet.
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self._sent and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete multi-byte character: wait for its other bytes
        for stop in self._stop:
            for k in range(min(len(stop) - 1, end - self._sent), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return end

    def _release(self, end: int) -> str:
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _flush(self) -> str:
        return self._release(len(self.text))
