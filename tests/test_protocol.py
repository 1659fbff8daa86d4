"""Wire protocol: sealing, the message guard, tensor payloads and blob digests."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from unitedllm.comm.local import LocalHub, MemoryBlobStore
from unitedllm.errors import IntegrityError, ProtocolError
from unitedllm.protocol.messages import BlobRef, Hello, Update
from unitedllm.protocol.payload import decode_tensors, encode_tensors, ref_for, verify
from unitedllm.protocol.signing import MessageGuard, open_frame, seal

SECRET = b"s" * 32


def update(**kw: object) -> Update:
    fields: dict[str, object] = dict(
        run_id="run", round=0, sender=1, seq=5, num_samples=3, delta_ref=BlobRef(digest="a" * 64, size=4)
    )
    fields.update(kw)
    return Update(**fields)  # type: ignore[arg-type]


def test_sealed_message_round_trips() -> None:
    msg = update(metrics={"train_loss": 1.5})
    assert open_frame(seal(msg, SECRET), SECRET) == msg


def test_tampered_frame_fails_the_mac() -> None:
    frame = bytearray(seal(update(), SECRET))
    frame[len(frame) // 2] ^= 0xFF
    with pytest.raises(ProtocolError):
        open_frame(bytes(frame), SECRET)
    with pytest.raises(ProtocolError, match="HMAC"):
        open_frame(seal(update(), b"wrong"), SECRET)


def test_guard_drops_forged_foreign_unknown_and_replayed() -> None:
    guard = MessageGuard(run_id="run", secret=SECRET, valid_senders={1, 2})
    good = seal(update(), SECRET)
    assert guard.admit(good) is not None
    assert guard.admit(good) is None, "a replayed frame must be dropped"
    assert guard.admit(seal(update(seq=6), b"forged")) is None
    assert guard.admit(seal(update(seq=7, run_id="other"), SECRET)) is None
    assert guard.admit(seal(update(seq=8, sender=7), SECRET)) is None
    assert guard.admit(seal(update(seq=9), SECRET)) is not None
    reasons = " | ".join(guard.dropped)
    for word in ("replayed", "HMAC", "other", "rank 7"):
        assert word in reasons


def test_guard_drops_garbage_without_raising() -> None:
    guard = MessageGuard(run_id="run", secret=SECRET, valid_senders={1})
    assert guard.admit(b"\x00\x01not msgpack") is None


def test_tensor_payload_round_trips_bytes_exactly() -> None:
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.ones(2, dtype=torch.bfloat16),
    }
    data = encode_tensors(tensors)
    assert data == encode_tensors(dict(reversed(list(tensors.items())))), (
        "bytes must not depend on dict order"
    )
    back = decode_tensors(data)
    assert set(back) == {"a", "b"}
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_malformed_payload_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="safetensors"):
        decode_tensors(b"definitely not safetensors")


def _payload(header: dict[str, object], body: bytes) -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(len(raw).to_bytes(8, "little") + raw + body)


def test_bytearray_payload_decodes_to_views_equal_to_safetensors() -> None:
    tensors = {
        "w": torch.randn(4, 3),
        "ids": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(7, dtype=torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "empty": torch.empty(0, 2),
        "scalar": torch.tensor(2.5),
    }
    data = bytearray(encode_tensors(tensors))
    views = decode_tensors(data)
    copied = decode_tensors(bytes(data))
    assert set(views) == set(copied) == set(tensors)
    for name, value in tensors.items():
        assert views[name].dtype == copied[name].dtype and torch.equal(views[name], copied[name])
        assert torch.equal(views[name], value)
    # Views, not copies: the update costs its size once.
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert all(base <= views[n].data_ptr() < base + len(data) for n in ("w", "ids", "h"))


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (bytearray(b"\x01\x02"), "too short"),
        (bytearray((10**6).to_bytes(8, "little") + b"{}"), "does not fit"),
        (
            _payload({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12),
            "do not hold shape",
        ),
        (
            _payload({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "do not hold shape",
        ),
        (
            _payload({"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            "malformed entry",
        ),
        (_payload({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""), "do not hold shape"),
        (
            _payload(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
        (_payload([1, 2], b""), "not a JSON object"),  # type: ignore[arg-type]
        (bytearray((3).to_bytes(8, "little") + b"{x}"), "not JSON"),
    ],
)
def test_malformed_bytearray_payload_is_a_protocol_error(payload: bytearray, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_tensors(payload)


def test_blob_digest_is_verified() -> None:
    data = b"payload bytes"
    ref = ref_for(data)
    verify(ref, data)
    with pytest.raises(IntegrityError, match=ref.digest):
        verify(ref, b"payload bytez")


def test_memory_store_refuses_corrupted_blob() -> None:
    async def scenario() -> None:
        hub = LocalHub(run_id="run", secret=SECRET, ranks={0, 1})
        async with MemoryBlobStore(hub) as store:
            ref = await store.put(b"x" * 100)
            assert await store.get(ref) == b"x" * 100
            hub.blobs[ref.digest] = b"y" * 100
            with pytest.raises(IntegrityError):
                await store.get(ref)

    asyncio.run(scenario())


def test_new_fields_have_defaults_for_older_peers() -> None:
    """Wire evolution: a Hello without optional fields still decodes."""
    import msgspec

    raw = msgspec.msgpack.encode({"kind": "hello", "run_id": "r", "round": -1, "sender": 1})
    from unitedllm.protocol.messages import Message

    msg = msgspec.msgpack.decode(raw, type=Message)
    assert isinstance(msg, Hello) and msg.capabilities == [] and msg.base_fingerprint is None


# ---- per-rank keys and bounded sequence numbers --------------------------------------------------

KEY_1, KEY_2 = b"1" * 32, b"2" * 32


def test_a_client_cannot_speak_as_another_rank() -> None:
    from unitedllm.protocol.messages import Finish
    from unitedllm.protocol.signing import RankKeys

    aggregator = MessageGuard(
        run_id="run", keys=RankKeys({1: KEY_1, 2: KEY_2}), receiver=0, valid_senders={1, 2}
    )
    assert aggregator.admit(seal(update(sender=1, seq=10), KEY_1)) is not None
    # Client 1 holds only its own key: an update "from rank 2" signed with it is refused.
    assert aggregator.admit(seal(update(sender=2, seq=11), KEY_1)) is None
    assert aggregator.admit(seal(update(sender=2, seq=12), KEY_2)) is not None
    # Nor can client 1 tell client 2 the run is over: client 2 checks the aggregator's frames with its own key.
    client_2 = MessageGuard(run_id="run", keys=RankKeys({2: KEY_2}), receiver=2, valid_senders={0})
    forged_finish = Finish(run_id="run", round=3, sender=0, seq=13, reason="completed")
    assert client_2.admit(seal(forged_finish, KEY_1)) is None
    assert client_2.admit(seal(forged_finish, KEY_2)) is not None
    assert "HMAC" in " | ".join(aggregator.dropped + client_2.dropped)


def test_a_forged_far_future_seq_cannot_silence_a_rank() -> None:
    import time

    guard = MessageGuard(run_id="run", secret=SECRET, valid_senders={1})
    assert guard.admit(seal(update(seq=2**63 - 1), SECRET)) is None, "a max-seq frame must be refused"
    assert "ahead of this clock" in guard.dropped[-1]
    assert guard.admit(seal(update(seq=time.time_ns()), SECRET)) is not None, (
        "the real rank still gets through"
    )


def test_transport_sequence_numbers_follow_the_clock() -> None:
    import time

    hub = LocalHub(run_id="run", ranks={0, 1}, keys={1: KEY_1})
    from unitedllm.comm.local import LocalTransport

    transport = LocalTransport(hub, rank=1)
    before = time.time_ns()
    first, second = transport.next_seq(), transport.next_seq()
    assert before <= first < second <= time.time_ns() + 1000


def test_presence_of_the_aggregator_is_checked_by_clients_with_their_own_key() -> None:
    from unitedllm.protocol.signing import PresenceGuard, RankKeys, seal_presence

    all_keys = RankKeys({1: KEY_1, 2: KEY_2})
    payload = seal_presence(all_keys, run_id="run", rank=0, online=True, epoch=5, receivers={1, 2})
    for rank, key in ((1, KEY_1), (2, KEY_2)):
        assert (
            PresenceGuard(run_id="run", keys=RankKeys({rank: key}), receiver=rank).admit(0, payload) is True
        )
    # Client 1 cannot mark client 2 offline for the aggregator: it does not hold rank 2's key.
    forged = seal_presence(RankKeys({2: KEY_1}), run_id="run", rank=2, online=False, epoch=9)
    aggregator = PresenceGuard(run_id="run", keys=all_keys, receiver=0)
    assert aggregator.admit(2, forged) is None
    assert aggregator.admit(2, seal_presence(all_keys, run_id="run", rank=2, online=False, epoch=9)) is False


def test_in_process_clients_hold_only_their_own_key() -> None:
    from unitedllm.comm.local import LocalTransport

    hub = LocalHub(run_id="run", ranks={0, 1, 2}, keys={1: KEY_1, 2: KEY_2})
    assert LocalTransport(hub, rank=1).keys.ranks() == {1}
    assert LocalTransport(hub, rank=0).keys.ranks() == {1, 2}
    assert LocalTransport(hub, rank=1).keys.link(0, 2) is None, "client 1 cannot sign as rank 2"


def test_a_flood_of_junk_frames_leaves_a_few_log_lines_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10,000 junk frames: every one is dropped, but the log gets the first few reasons and one summary line."""
    from unitedllm.protocol.drop_log import DropLog

    now = [0.0]
    guard = MessageGuard(run_id="run", secret=SECRET, valid_senders={1})
    guard._drop_log = DropLog(
        "message", logging.getLogger("unitedllm.protocol.signing"), clock=lambda: now[0]
    )
    with caplog.at_level("WARNING", logger="unitedllm.protocol.signing"):
        for i in range(10_000):
            assert guard.admit(b"junk %d" % i) is None
        now[0] += 61.0  # the next window: the summary of the last one is written
        assert guard.admit(b"junk again") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 + 1 + 1, lines[:3]
    assert all(line.startswith("dropped message: malformed") for line in lines[:10])
    assert lines[10].startswith("dropped 9990 more message frame(s) in the last 60 s"), lines[10]
    assert "malformed" in lines[10] and lines[11].startswith("dropped message: malformed")
    assert len(guard.dropped) == 1000, "the reasons kept in memory stay bounded"
