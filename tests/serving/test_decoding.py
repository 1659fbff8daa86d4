"""Streamed text: deltas add up to the final text, and no part of a stop string is ever sent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unitedllm.serving.decoding import TextAssembler

PIECES = ["a", "b", "ab", "##", "#", " ", "\n", "é", "xyz"]
EOS = len(PIECES)


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(PIECES)), min_size=1, max_size=30),
    stop=st.lists(st.sampled_from(["##", "b a", "\n\n", "xyzx", "é"]), max_size=2),
    max_tokens=st.integers(1, 40),
)
def test_deltas_add_up_and_never_leak_a_stop_string(
    tokens: list[int], stop: list[str], max_tokens: int
) -> None:
    text = TextAssembler(decode, eos_token_id=EOS, stop=stop, max_tokens=max_tokens)
    sent = ""
    for token in tokens:
        sent += text.push(token)
        if text.finish_reason is not None:
            break
    if text.finish_reason is not None:
        assert sent == text.text
        assert text.completion_tokens <= max_tokens
    assert not any(s in sent for s in stop)
    full = decode([t for t in tokens[: text.completion_tokens] if t != EOS])
    assert full.startswith(sent)
    hits = [full.find(s) for s in stop if s in full]
    if hits:  # cut right before the first stop string
        assert text.finish_reason == "stop" and text.text == full[: min(hits)]
