"""Property-based fuzz of frame and presence decoding: whatever arrives on a run's topics, no exception escapes.

Anyone with the broker login can publish anything on a run's topics. The guards must turn every
payload into "admitted" or "dropped" (with a reason), never an exception that ends a process.
The default run tries a few thousand cases; ``nox -s slow`` runs the same properties on 100,000+.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitedllm.protocol.messages import BlobRef, Finish, Message, RoundStart, TrainSpec, Update
from unitedllm.protocol.signing import MessageGuard, PresenceGuard, RankKeys, seal, seal_presence

KEYS = RankKeys({1: b"k1" * 16, 2: b"k2" * 16})
RUN = "fuzz-run"

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
# Anything msgpack can carry, nested: what a hostile publisher builds to look almost like a frame.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=80),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10) | _ints, inner, max_size=5)
    ),
    max_leaves=20,
)
_messages = st.one_of(
    st.builds(
        Update,
        run_id=st.sampled_from([RUN, "other", ""]),
        round=_ints,
        sender=_ints,
        seq=_ints,
        delta_ref=st.builds(BlobRef, digest=st.text(max_size=70), size=_ints),
        num_samples=_ints,
    ),
    st.builds(
        RoundStart,
        run_id=st.just(RUN),
        round=_ints,
        sender=st.sampled_from([0, 1, 2, 3]),
        seq=_ints,
        global_ref=st.builds(BlobRef, digest=st.text(max_size=70), size=_ints),
        spec=st.builds(TrainSpec, local_max_steps=_ints, local_num_train_epochs=st.floats()),
    ),
    st.builds(Finish, run_id=st.just(RUN), round=_ints, sender=_ints, seq=_ints, reason=st.text(max_size=30)),
)


def _raw_payloads() -> st.SearchStrategy[bytes]:
    encode = msgspec.msgpack.encode
    return st.one_of(
        st.binary(max_size=300),
        _values.map(encode),
        st.tuples(st.binary(max_size=200), st.binary(max_size=40)).map(encode),
        st.tuples(_values.map(encode), st.binary(min_size=32, max_size=32)).map(encode),
        st.tuples(st.booleans(), _ints, st.dictionaries(_ints, st.binary(max_size=40), max_size=4)).map(
            encode
        ),
    )


def _signed(message: Message, key_rank: int) -> bytes:
    key = KEYS.link(key_rank, 0)
    assert key is not None
    return seal(message, key)


def check_frame(frame: bytes, receiver: int) -> None:
    senders = {1, 2} if receiver == 0 else {0}
    keys = KEYS if receiver == 0 else RankKeys({receiver: KEYS.link(receiver, 0) or b""})
    guard = MessageGuard(run_id=RUN, keys=keys, receiver=receiver, valid_senders=senders)
    message = guard.admit(frame)
    if message is not None:
        assert message.run_id == RUN and message.sender in senders
        assert message.seq <= time.time_ns() + 10**12, "a far-future seq is never admitted"
    else:
        assert guard.dropped, "a dropped frame always says why"


def check_presence(payload: bytes, rank: int, receiver: int) -> None:
    guard = PresenceGuard(run_id=RUN, keys=KEYS, receiver=receiver)
    assert guard.admit(rank, payload) in (True, False, None)


def _properties(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _run_all(examples: int) -> None:
    @_properties(examples)
    @given(frame=_raw_payloads(), receiver=st.sampled_from([0, 1, 2]))
    def raw_frames(frame: bytes, receiver: int) -> None:
        check_frame(frame, receiver)

    @_properties(examples)
    @given(message=_messages, key_rank=st.sampled_from([1, 2]), receiver=st.sampled_from([0, 1, 2]))
    def signed_frames(message: Message, key_rank: int, receiver: int) -> None:
        check_frame(_signed(message, key_rank), receiver)

    @_properties(examples)
    @given(payload=_raw_payloads(), rank=_ints, receiver=st.sampled_from([0, 1, 2]))
    def raw_presence(payload: bytes, rank: int, receiver: int) -> None:
        check_presence(payload, rank, receiver)

    @_properties(examples)
    @given(
        online=st.booleans(),
        epoch=_ints,
        rank=st.sampled_from([0, 1, 2, 5]),
        receiver=st.sampled_from([0, 1, 2]),
    )
    def signed_presence(online: bool, epoch: int, rank: int, receiver: int) -> None:
        try:
            payload = seal_presence(
                KEYS, run_id=RUN, rank=rank, online=online, epoch=epoch, receivers={0, 1, 2}
            )
        except OverflowError:
            return  # msgpack cannot even encode it, so no one can send it
        check_presence(payload, rank, receiver)

    for prop in (raw_frames, signed_frames, raw_presence, signed_presence):
        prop()


@pytest.fixture(autouse=True)
def quiet_guards() -> Iterator[None]:
    """Every dropped frame is logged as a warning; a campaign of 100,000 needs no such noise."""
    logger = logging.getLogger("unitedllm.protocol.signing")
    before = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(before)


def test_frame_and_presence_decoding_never_raises() -> None:
    _run_all(1_000)  # four properties: a few thousand cases in the default run


@pytest.mark.slow
def test_frame_and_presence_decoding_never_raises_long_campaign() -> None:
    _run_all(25_000)  # four properties: 100,000 cases
